# Two entry points for a fresh machine (see README "Quick start"):
#   make demo   set up .venv, export the tiny twin at budget 0.2, run it on an image, compare stages,
#               check it for a Jetson Orin, build TensorRT-RTX engines
#   make test   set up .venv, run the test suite
# torch is installed first and pinned to 2.13.0: that version is a local CPU wheel here, while a
# bare `pip install torch` would pull several GB of CUDA packages.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml runtime/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(TORCH)
	$(BIN)/pip install -q --disable-pip-version-check -e './runtime[cpu]' -e '.[dev,trt-rtx,serve,cpu]'
	touch $@

demo: setup
	$(BIN)/edgeprune export llava-next-tiny --budget 0.2 --out export/tiny
	$(BIN)/edgeprune sample-image demo/table.png
	$(BIN)/edgeprune run export/tiny --image demo/table.png --prompt "What is on the table?" --max-new-tokens 24
	$(BIN)/edgeprune compare export/tiny --image demo/table.png
	$(BIN)/edgeprune check export/tiny --target jetson-orin-jp61
	$(BIN)/edgeprune build export/tiny --target rtx

test: setup
	$(BIN)/python -m pytest -q tests

bench: setup
	$(BIN)/edgeprune bench llava-next-7b-shape --budget 0.2 --layers 2

clean:
	rm -rf export/*/ demo build

.PHONY: mutants readme-tables

# mutmut over plan, selection, layout, kvcache and preprocess with their fast tests (scripts/mutation.py):
# per-module scores and every survivor in docs/results/mutation.json
mutants: setup
	$(BIN)/python scripts/mutation.py

# the README's generated sections (figures, tables) from docs/results/*.json
readme-tables: setup
	$(BIN)/python scripts/readme_tables.py
