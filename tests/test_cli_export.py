"""The `edgeprune` command line, run as a user runs it (a subprocess of the installed script).

User errors must end with a non-zero exit code and one `error: ...` line, no traceback and no
half-written bundle; `--help` must not pay for torch/transformers/onnx imports.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EDGEPRUNE = Path(sys.executable).with_name("edgeprune")
HEAVY = ("torch", "transformers", "onnx", "tensorrt")


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    assert EDGEPRUNE.is_file(), f"{EDGEPRUNE} missing: pip install -e . into the venv"
    return subprocess.run([str(EDGEPRUNE), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _heavy_modules_after(code: str) -> list[str]:
    probe = code + f"\nprint('HEAVY=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("HEAVY=")][-1]
    return [m for m in line[len("HEAVY="):].split(",") if m]


@pytest.mark.parametrize("argv", [["--help"], ["export", "--help"], ["tiny", "--help"], ["models"]],
                         ids=["help", "export-help", "tiny-help", "models"])
def test_cli_commands_do_not_import_heavy_modules(argv):
    code = ("import sys\nimport edgeprune, edgeprune.cli\n"
            f"sys.argv = ['edgeprune', *{argv!r}]\n"
            "try:\n    edgeprune.cli.main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n")
    assert _heavy_modules_after(code) == []


def test_importing_packages_is_light():
    assert _heavy_modules_after("import sys\nimport edgeprune, edgeprune.cli, edgeprune.registry, "
                                "edgeprune.recipe, edgeprune.errors\nedgeprune.registry.names()") == []


def test_runtime_never_imports_torch_transformers_onnx():
    code = ("import sys, pkgutil, importlib, edgeprune_runtime\n"
            "for m in pkgutil.iter_modules(edgeprune_runtime.__path__):\n"
            "    if m.name != '__main__':\n"
            "        importlib.import_module('edgeprune_runtime.' + m.name)\n")
    assert [m for m in _heavy_modules_after(code) if m != "tensorrt"] == []


def test_help_lists_commands(tmp_path):
    result = run_cli("--help", cwd=tmp_path)
    assert result.returncode == 0
    for command in ("export", "tiny", "models"):
        assert re.search(rf"^\s+{command}\b", result.stdout, re.M), result.stdout
    models = run_cli("models", cwd=tmp_path)
    assert models.returncode == 0
    assert {ln.split()[0] for ln in models.stdout.splitlines()} >= {"llava-next", "llava-next-tiny",
                                                                     "llava-next-7b-shape"}


# --- user errors ------------------------------------------------------------------------------------


def _model_dir(tmp_path: Path, kind: str) -> str:
    d = tmp_path / kind
    if kind == "missing":
        return str(d)
    d.mkdir()
    if kind == "llama":
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    elif kind == "bad-json":
        (d / "config.json").write_text("{not json")
    return str(d)


ERROR_CASES = {
    "missing-model-dir": (lambda t: ["llava-next", "--model", _model_dir(t, "missing")], r"does not exist"),
    "llama-model-dir": (lambda t: ["llava-next", "--model", _model_dir(t, "llama")],
                        r"holds a 'llama' model, not LLaVA-NeXT"),
    "no-config-json": (lambda t: ["llava-next", "--model", _model_dir(t, "empty")], r"has no config\.json"),
    "bad-config-json": (lambda t: ["llava-next", "--model", _model_dir(t, "bad-json")], r"not valid JSON"),
    "budget-1.5": (lambda t: ["llava-next-tiny", "--budget", "1.5"], r"budget must be in \(0, 1\]"),
    "budget-0": (lambda t: ["llava-next-tiny", "--budget", "0"], r"budget must be in \(0, 1\]"),
    "budget-0.0001": (lambda t: ["llava-next-tiny", "--budget", "0.0001"], r"keeps no visual token"),
    "unknown-model": (lambda t: ["llava-next-tiyn"], r"Did you mean 'llava-next-tiny'"),
    "unknown-strategy": (lambda t: ["llava-next-tiny", "--strategy", "global_topk"], r"Did you mean 'global-topk'"),
}


@pytest.fixture(scope="module", params=sorted(ERROR_CASES))
def failed_export(request, tmp_path_factory):
    """(case name, CompletedProcess, work dir) for one failing `edgeprune export`; each runs once."""
    work = tmp_path_factory.mktemp(request.param)
    make_args, _ = ERROR_CASES[request.param]
    args = make_args(work)
    before = sorted(p.name for p in work.iterdir())
    result = run_cli("export", *args, "--out", str(work / "bundle"), cwd=work)
    return request.param, result, work, before


def test_export_user_error_exits_cleanly(failed_export):
    name, result, work, before = failed_export
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: "), result.stderr
    assert len(last.split("\n")) == 1 and re.search(ERROR_CASES[name][1], last), last
    assert sorted(p.name for p in work.iterdir()) == before, "a bundle, scratch or export/ dir was left behind"


def test_export_user_error_is_one_stderr_line(failed_export):
    _, result, _, _ = failed_export
    lines = result.stderr.rstrip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr


def test_tiny_refuses_a_checkpoint_model(tmp_path):
    result = run_cli("tiny", "llava-next", str(tmp_path / "x"), cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


# --- `edgeprune tiny` writes a real Hugging Face checkpoint -------------------------------------------


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    work = tmp_path_factory.mktemp("tiny-ckpt")
    result = run_cli("tiny", "llava-next-tiny", str(work / "ckpt"), cwd=work)
    assert result.returncode == 0, result.stderr
    assert "saved llava-next-tiny" in result.stdout
    return work / "ckpt"


def test_tiny_checkpoint_loads_and_matches_in_code_twin(tiny_checkpoint, tiny):
    from PIL import Image
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    model = LlavaNextForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="eager").eval()
    processor = LlavaNextProcessor.from_pretrained(tiny_checkpoint)
    image = Image.new("RGB", (150, 90), (30, 160, 90))
    prompt = "USER: <image>\nWhat color is the car? ASSISTANT:"
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    reference = tiny.processor(images=image, text=prompt, return_tensors="pt")
    assert inputs["input_ids"].tolist() == reference["input_ids"].tolist()
    torch.testing.assert_close(inputs["pixel_values"], reference["pixel_values"], atol=0, rtol=0)
    assert processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
        add_generation_prompt=True) == "USER: <image>\nhi ASSISTANT:"
    with torch.no_grad():
        got = model(**inputs).logits
        want = tiny.model(**reference).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_export_from_saved_checkpoint(tiny_checkpoint, tiny, tmp_path):
    """`edgeprune export llava-next --model DIR` on the saved twin: a valid bundle of the same weights."""
    from edgeprune_runtime.manifest import load_manifest

    out = tmp_path / "bundle"
    result = run_cli("export", "llava-next", "--model", str(tiny_checkpoint), "--budget", "0.2",
                     "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"bundle {out}" in result.stdout and "K=64 of 320" in result.stdout
    manifest = load_manifest(out, verify_hashes=True)
    assert manifest.data["source"]["weights_sha256"] == tiny.weights_sha256
    assert manifest.data["source"]["path"] == str(tiny_checkpoint.resolve())
    assert manifest.data["recipe"]["budget"] == 0.2
    # the checkpoint's recipe is llava-next.toml (64/64 text slots), not the tiny one
    assert manifest.shapes.text_slots_before_image == 64 and manifest.shapes.visual_topk == 64
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


@pytest.mark.parametrize("argv", [["models"], ["targets", "--json"], ["--help"]])
def test_an_output_that_cannot_be_written_is_one_error_line(argv):
    """/dev/full fails every write (ENOSPC): one `error:` line and exit 2, not a traceback."""
    with open("/dev/full", "w") as full:
        out = subprocess.run([str(EDGEPRUNE), *argv], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: cannot write the output") and out.stderr.count("\n") == 1, out.stderr
