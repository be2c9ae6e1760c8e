"""JSON for scripts (`--json` on export, models, sweep, tiny, sample-image; `info`), `--version` on both CLIs,
and a bare `edgeprune`. Expected values come from the files on disk, the runtime's own answer and the
text output of the same commands, not from the code that builds the JSON."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EDGEPRUNE = Path(sys.executable).with_name("edgeprune")


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(EDGEPRUNE), *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd)


def one_json(result: subprocess.CompletedProcess):
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, result.stdout  # one object, nothing else on stdout
    return json.loads(lines[0])


def disk_sizes(bundle: Path) -> dict[str, int]:
    return {p.relative_to(bundle).as_posix(): p.stat().st_size for p in bundle.rglob("*")
            if p.is_file() and p.name != "manifest.json"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """`edgeprune export llava-next-tiny --budget 0.2 --json` from a directory outside the repository."""
    work = tmp_path_factory.mktemp("json")
    result = cli("export", "llava-next-tiny", "--budget", "0.2", "--out", "bundle", "--json", cwd=work)
    return work, one_json(result)


def test_export_json(exported):
    from edgeprune.export import STAGES

    work, report = exported
    bundle = work / "bundle"
    assert report["bundle"] == str(bundle.resolve())
    sample = one_json(cli("sample-image", work / "photo.png", "--json"))
    ran = one_json(cli("run", bundle, "--image", sample["path"], "--prompt", "What?", "--max-new-tokens", "1", "--json"))
    assert report["k"] == ran["visual_tokens"] == 64  # the runtime counts the valid visual slots itself
    assert report["slots"]["prefill"] == report["slots"]["text_before_image"] + report["slots"]["visual"] + \
        report["slots"]["text_after_image"]
    assert report["sizes"]["files"] == disk_sizes(bundle)
    assert report["sizes"]["total_bytes"] == sum(disk_sizes(bundle).values())
    assert list(report["timings"]["stages"]) == [s for s in STAGES if s in report["timings"]["stages"]]
    assert all(t >= 0 for t in report["timings"]["stages"].values())
    assert sum(report["timings"]["stages"].values()) <= report["timings"]["total_s"]


def test_info_json_and_text(exported):
    work, report = exported
    bundle = work / "bundle"
    info = one_json(cli("info", bundle, "--json", "--verify"))
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert info["verified"] is True and info["mismatches"] == []
    assert info["sizes"]["files"] == disk_sizes(bundle)
    assert info["model"]["model"] == "llava-next-tiny" and info["recipe"] == manifest["recipe"]
    assert info["shapes"] == manifest["shapes"] and info["engines"] == {}
    assert info["graphs"]["vision"]["bytes"] == sum(disk_sizes(bundle)[f] for f in ("vision/vision.onnx",
                                                                                    "vision/vision.weights"))
    assert cli("info", bundle, "--json").returncode == 0 and one_json(cli("info", bundle, "--json"))["verified"] is None
    text = cli("info", bundle)
    assert text.returncode == 0 and "K=64 of 320 patch tokens" in text.stdout and "llava-next-tiny" in text.stdout


def test_info_verify_lists_every_tampered_file(exported, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(exported[0] / "bundle", bundle)
    for rel in ("lm/lm.weights", "tokenizer.json"):
        data = bytearray((bundle / rel).read_bytes())
        data[len(data) // 2] ^= 0x01
        (bundle / rel).write_bytes(data)
    result = cli("info", bundle, "--verify", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["mismatches"] == ["lm/lm.weights", "tokenizer.json"]
    text = cli("info", bundle, "--verify")
    assert text.returncode == 1 and "MISMATCH: lm/lm.weights, tokenizer.json" in text.stdout


@pytest.mark.parametrize("make, pattern", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "no manifest.json"),
    (lambda d: (d.mkdir(), (d / "manifest.json").write_text("{not json")), "manifest"),
])
def test_info_on_a_non_bundle_is_one_error_line(tmp_path, make, pattern):
    target = tmp_path / "b"
    make(target)
    result = cli("info", target, "--json")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1 and \
        re.search(pattern, result.stderr), result.stderr


def test_models_json_matches_the_table():
    listed = {line.split()[0] for line in cli("models").stdout.splitlines()}
    models = one_json(cli("models", "--json"))
    assert set(models) == listed
    assert models["llava-next-tiny"]["checkpoint"] is False and models["llava-next"]["checkpoint"] is True
    from edgeprune.recipe import RECIPE_DIR

    assert all((RECIPE_DIR / m["recipe"]).is_file() for m in models.values())


def test_sample_image_json(tmp_path):
    from PIL import Image

    out = one_json(cli("sample-image", tmp_path / "s.png", "--size", "320x200", "--json"))
    assert (out["width"], out["height"]) == Image.open(out["path"]).size == (320, 200)


def test_tiny_json(tmp_path):
    out = one_json(cli("tiny", "llava-next-tiny", tmp_path / "ckpt", "--json"))
    assert out["path"] == str(tmp_path / "ckpt")
    assert sorted(out["files"]) == sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.is_file())
    assert "config.json" in out["files"] and "model.safetensors" in out["files"]


def test_sweep_json_is_the_report_it_writes(tmp_path):
    out = tmp_path / "sweep"
    report = one_json(cli("sweep", "llava-next-tiny", "--budgets", "0.2", "--strategies", "uniform",
                          "--max-new-tokens", "2", "--out", out, "--json"))
    written = json.loads((out / "sweep.json").read_text())
    assert report["files"] == {"json": str(out / "sweep.json"), "png": str(out / "sweep.png")}
    assert {k: v for k, v in report.items() if k != "files"} == written
    assert [(r["strategy"], r["budget"], r["visual_tokens"]) for r in report["rows"]] == [("uniform", 0.2, 64)]


def test_bare_edgeprune_prints_the_usage_and_exits_0(tmp_path):
    result = cli(cwd=tmp_path)
    assert result.returncode == 0 and result.stderr == ""
    assert result.stdout.startswith("Usage: edgeprune") and re.search(r"^\s+serve\b", result.stdout, re.M)
    unknown = cli("frobnicate")
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1
    assert unknown.stderr.startswith("error:") and "Usage" not in unknown.stderr


def test_version_on_both_clis():
    from importlib import metadata

    ort = metadata.version("onnxruntime")
    tool = cli("--version")
    assert tool.returncode == 0
    assert tool.stdout.startswith(f"edgeprune {metadata.version('edgeprune')}, edgeprune-runtime "
                                  f"{metadata.version('edgeprune-runtime')} (onnxruntime {ort}; providers ")
    for module in ("edgeprune_runtime", "edgeprune_runtime.server"):
        runtime = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True, timeout=120)
        assert runtime.returncode == 0 and f"onnxruntime {ort}" in runtime.stdout, runtime.stderr
        assert "CPUExecutionProvider" in runtime.stdout


def test_runtime_without_onnxruntime_names_the_extras(tmp_path, exported):
    """A runtime whose ONNX Runtime is missing (hidden by a module that fails to import) says which extra to install."""
    shadow = tmp_path / "shadow"
    (shadow / "onnxruntime").mkdir(parents=True)
    (shadow / "onnxruntime" / "__init__.py").write_text("raise ImportError('No module named onnxruntime')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    args = [str(exported[0] / "bundle"), "--image", "x.png", "--prompt", "x"]
    result = subprocess.run([sys.executable, "-m", "edgeprune_runtime", *args], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "edgeprune-runtime[cpu]" in result.stderr and "[cuda]" in result.stderr
    version = subprocess.run([sys.executable, "-m", "edgeprune_runtime", "--version"], capture_output=True, text=True,
                             timeout=120, env=env)
    assert version.returncode == 0 and "no ONNX Runtime" in version.stdout
