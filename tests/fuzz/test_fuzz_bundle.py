"""Fuzzing the bundle (untrusted input): manifests, weight indexes, tokenizer files and the directory itself.

Property, for every generated bundle: Bundle_Create and one request return statuses (never an exception,
never INTERNAL_ERROR) with one-line messages; the runtime's traced memory stays within the budget it was
given; nothing outside the bundle is opened, listed or read (conftest.load_and_serve).
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fuzz_harness import BUDGET_MB, fresh_copy, fuzz_settings, load_and_serve
from edgeprune_runtime import Status
from fuzz_strategies import byte_mutation, dumps, json_mutation

CI = {"manifest": 50, "weights": 20, "tokenizer": 20, "directory": 20, "budget": 15}


def _manifest(root) -> dict:
    return json.loads((root / "manifest.json").read_text())


def _rehash(root, rel) -> None:
    data = _manifest(root)
    data["files"][rel] = hashlib.sha256((root / rel).read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(data))


# --- manifest.json ------------------------------------------------------------------------------------------


def manifest_property(master, data):
    root = fresh_copy(master)
    base = _manifest(root)
    tree, ops = data.draw(json_mutation(base, str(master.decoys.root)), label="mutation")
    (root / "manifest.json").write_text(dumps(tree))
    outcome = load_and_serve(master, root, note={"ops": ops})
    if tree == base:
        assert outcome.load == Status.OK


@fuzz_settings(CI["manifest"])
@given(st.data())
def test_manifest_mutations(master, data):
    manifest_property(master, data)


@pytest.mark.fuzz_deep
@fuzz_settings(CI["manifest"], deep=True)
@given(st.data())
def test_manifest_mutations_deep(master, data):
    manifest_property(master, data)


# --- lm/lm.weights.json (re-hashed, so the index checks are what is tested) -------------------------------


def weights_property(master, data):
    root = fresh_copy(master)
    path = root / "lm" / "lm.weights.json"
    index = json.loads(path.read_text())
    tree, ops = data.draw(json_mutation(index, str(master.decoys.root)), label="mutation")
    path.write_text(dumps(tree))
    _rehash(root, "lm/lm.weights.json")
    outcome = load_and_serve(master, root, note={"weights_ops": ops})
    if tree == index:
        assert outcome.load == Status.OK


@fuzz_settings(CI["weights"])
@given(st.data())
def test_weight_index_mutations(master, data):
    weights_property(master, data)


@pytest.mark.fuzz_deep
@fuzz_settings(CI["weights"], deep=True)
@given(st.data())
def test_weight_index_mutations_deep(master, data):
    weights_property(master, data)


# --- tokenizer.json: its JSON, or its bytes ---------------------------------------------------------------


def tokenizer_property(master, data):
    root = fresh_copy(master)
    path = root / "tokenizer.json"
    if data.draw(st.booleans(), label="as JSON"):
        tree, ops = data.draw(json_mutation(json.loads(path.read_text()), str(master.decoys.root)), label="mutation")
        path.write_text(dumps(tree))
    else:
        mutated, ops = data.draw(byte_mutation(path.read_bytes()), label="bytes")
        path.write_bytes(mutated)
    _rehash(root, "tokenizer.json")
    load_and_serve(master, root, note={"tokenizer_ops": ops})


@fuzz_settings(CI["tokenizer"])
@given(st.data())
def test_tokenizer_mutations(master, data):
    tokenizer_property(master, data)


@pytest.mark.fuzz_deep
@fuzz_settings(CI["tokenizer"], deep=True)
@given(st.data())
def test_tokenizer_mutations_deep(master, data):
    tokenizer_property(master, data)


# --- the directory: extra, missing, linked, special and truncated files ------------------------------------


FILES = ["tokenizer.json", "vision/vision.onnx", "vision/vision.weights", "lm/prefill.onnx", "lm/decode.onnx",
         "lm/lm.weights", "lm/lm.weights.json"]


def directory_property(master, data):
    root = fresh_copy(master)
    ops = []
    for _ in range(data.draw(st.integers(1, 3), label="count")):
        kind = data.draw(st.sampled_from(["extra", "remove", "symlink_out", "symlink_in", "fifo", "truncate",
                                          "dir_link", "unlist", "rehash_truncated"]), label="kind")
        rel = data.draw(st.sampled_from(FILES), label="file")
        target = root / rel
        if any(p.is_symlink() for p in target.parents if root in p.parents):
            continue  # an earlier dir_link: editing through it would edit the decoys outside the bundle
        if kind == "extra":
            extra = root / data.draw(st.sampled_from(["notes.txt", "lm/extra.bin", ".hidden", "engines/x/y.engine"]))
            extra.parent.mkdir(parents=True, exist_ok=True)
            extra.write_text("x")
        elif kind == "remove" and target.exists() and not target.is_symlink():
            target.unlink()
        elif kind in ("symlink_out", "symlink_in") and target.exists() and not target.is_symlink():
            target.unlink()
            target.symlink_to(master.decoys.root / rel if kind == "symlink_out" else root / "tokenizer.json")
        elif kind == "fifo" and not (root / "lm" / "pipe").exists():
            os.mkfifo(root / "lm" / "pipe")
        elif kind in ("truncate", "rehash_truncated") and target.is_file() and not target.is_symlink():
            target.write_bytes(target.read_bytes()[: data.draw(st.integers(0, 64), label="keep")])
            if kind == "rehash_truncated":
                _rehash(root, rel)
        elif kind == "dir_link" and (root / "vision").is_dir() and not (root / "vision").is_symlink():
            os.rename(root / "vision", root / "vision-real")
            (root / "vision").symlink_to(master.decoys.root / "vision", target_is_directory=True)
        elif kind == "unlist":
            data_ = _manifest(root)
            data_["files"].pop(rel, None)
            (root / "manifest.json").write_text(json.dumps(data_))
        ops.append((kind, rel))
    outcome = load_and_serve(master, root, note={"directory_ops": ops})
    assert outcome.load != Status.OK or all(k in ("rehash_truncated",) for k, _ in ops), ops


@fuzz_settings(CI["directory"])
@given(st.data())
def test_directory_mutations(master, data):
    directory_property(master, data)


@pytest.mark.fuzz_deep
@fuzz_settings(CI["directory"], deep=True)
@given(st.data())
def test_directory_mutations_deep(master, data):
    directory_property(master, data)


# --- the budget: a bundle with an 11 MiB cache under budgets from 1 MiB up ---------------------------------


def budget_property(master, data):
    root = fresh_copy(master, master.long_cache)
    budget = data.draw(st.integers(1, BUDGET_MB), label="budget MiB")
    if data.draw(st.booleans(), label="mutate"):
        tree, ops = data.draw(json_mutation(_manifest(root), str(master.decoys.root), max_ops=1), label="mutation")
        (root / "manifest.json").write_text(dumps(tree))
    outcome = load_and_serve(master, root, budget_mb=budget, note={"budget_mb": budget})
    if outcome.load == Status.OK:
        assert budget >= 11  # the cache alone needs ~11 MiB: a smaller budget never loads


@fuzz_settings(CI["budget"])
@given(st.data())
def test_budget_is_enforced(master, data):
    budget_property(master, data)


@pytest.mark.fuzz_deep
@fuzz_settings(CI["budget"], deep=True)
@given(st.data())
def test_budget_is_enforced_deep(master, data):
    budget_property(master, data)
