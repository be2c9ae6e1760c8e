"""Both packages as a user installs them: wheels built from the source tree, installed (not editable) into
fresh venvs, used from a directory outside the repository.

- toolchain venv: torch==2.13.0 first (a local CPU wheel on our machines; a bare `pip install torch` pulls GBs
  of CUDA packages), then `edgeprune-runtime[cpu]` and `edgeprune[cpu]` from the wheels; `edgeprune export`
  finds its recipe inside the installed package, `edgeprune run` answers;
- runtime venv: the runtime wheel alone, first without an ONNX Runtime (one error line naming the extras),
  then with `[cpu]`: `python -m edgeprune_runtime` gives `edgeprune run`'s token ids, and nothing heavy is in it.

About two minutes (two venvs, torch from the local wheel), so opt-in: `pytest -m wheels tests/test_packaging.py`,
a step of its own in .ci/run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # as the Makefile: the CPU wheel on our machines
PIP = ["-m", "pip", "install", "-q", "--disable-pip-version-check"]

pytestmark = pytest.mark.wheels


@pytest.fixture(autouse=True)
def _opt_in(request):
    if "wheels" not in (request.config.option.markexpr or ""):
        pytest.skip("opt-in (two fresh venvs, ~2 minutes): pytest -m wheels tests/test_packaging.py")


def _run(cmd: list, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, cmd))}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def source_copy(dest: Path) -> Path:
    """The repository's files as a clean clone has them (git's tracked and not-ignored files), nothing built."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


@pytest.fixture(scope="module")
def wheels(tmp_path_factory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("wheels")
    src = source_copy(work / "src")
    dist = work / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, src,
          src / "runtime"], cwd=work)
    found = {w.name.split("-")[0]: w for w in dist.glob("*.whl")}
    assert set(found) == {"edgeprune", "edgeprune_runtime"}, found
    return found


def fresh_venv(path: Path) -> Path:
    venv.create(path, with_pip=True)
    return path / "bin" / "python"


def test_installed_wheels_export_and_run_outside_the_repository(tmp_path, wheels):
    outside = tmp_path / "elsewhere"  # cwd of every command: no recipes/, no checkout around
    outside.mkdir()
    tool = fresh_venv(tmp_path / "tool-venv")
    _run([tool, *PIP, TORCH], cwd=outside)
    _run([tool, *PIP, f"{wheels['edgeprune_runtime']}[cpu]", f"{wheels['edgeprune']}[cpu]"], cwd=outside)
    where = _run([tool, "-c", "import edgeprune, edgeprune_runtime, edgeprune.recipe as r; "
                  "print(edgeprune.__file__); print(edgeprune_runtime.__file__); print(r.RECIPE_DIR)"], cwd=outside)
    site = str(tmp_path / "tool-venv")
    assert all(line.startswith(site) for line in where.stdout.splitlines()), where.stdout  # not the checkout

    edgeprune = tool.with_name("edgeprune")
    _run([edgeprune, "export", "llava-next-tiny", "--budget", "0.2", "--out", "X"], cwd=outside)
    _run([edgeprune, "sample-image", "table.png"], cwd=outside)
    args = ["X", "--image", "table.png", "--prompt", "What is on the table?", "--max-new-tokens", "8", "--json"]
    ours = json.loads(_run([edgeprune, "run", *args], cwd=outside).stdout)
    assert len(ours["token_ids"]) == 8 and ours["visual_tokens"] == 64

    runtime = fresh_venv(tmp_path / "runtime-venv")
    _run([runtime, *PIP, wheels["edgeprune_runtime"]], cwd=outside)
    bare = subprocess.run([runtime, "-m", "edgeprune_runtime", *args], cwd=outside, capture_output=True, text=True,
                          timeout=300)
    assert bare.returncode == 2 and "Traceback" not in bare.stderr
    assert bare.stderr.startswith("error: ONNX Runtime is not installed") and "edgeprune-runtime[cpu]" in bare.stderr
    _run([runtime, *PIP, f"{wheels['edgeprune_runtime']}[cpu]"], cwd=outside)
    alone = json.loads(_run([runtime, "-m", "edgeprune_runtime", *args], cwd=outside).stdout)
    assert alone["token_ids"] == ours["token_ids"]
    heavy = _run([runtime, "-c", "import importlib.util as u; print([m for m in ('torch', 'transformers', 'onnx', "
                  "'edgeprune') if u.find_spec(m)])"], cwd=outside)
    assert heavy.stdout.strip() == "[]"
