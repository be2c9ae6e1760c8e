"""`python -m edgeprune_runtime`: streaming, --json, and one-line errors with exit code 2."""

import json
import subprocess
import sys
from pathlib import Path

from edgeprune_runtime.cli import main

RUNTIME = Path(__file__).resolve().parents[2] / "runtime"


def test_json_output(fake_bundle, images, capsys):
    root, _ = fake_bundle
    code = main([str(root), "--image", str(images["wide"]), "--prompt", "What is in the picture?", "--json",
                 "--max-new-tokens", "5"])
    assert code == 0
    out = capsys.readouterr().out
    lines = out.strip().splitlines()
    assert len(lines) == 1
    d = json.loads(lines[0])
    assert {"token_ids", "text", "visual_tokens", "ttft_s", "decode_tokens_per_s", "stop_reason"} <= set(d)
    assert 1 <= len(d["token_ids"]) <= 5


def test_streaming_output(fake_bundle, images, capsys):
    root, _ = fake_bundle
    code = main([str(root), "--image", str(images["tall"]), "--prompt", "hi", "--max-new-tokens", "4",
                 "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"])
    captured = capsys.readouterr()
    assert code == 0
    assert "stop:" in captured.err and "visual tokens" in captured.err


def test_user_errors_exit_2_with_one_line(fake_bundle, images, capsys, tmp_path):
    root, _ = fake_bundle
    cases = [
        [str(tmp_path / "none"), "--image", str(images["wide"]), "--prompt", "x"],
        [str(root), "--image", str(tmp_path / "none.png"), "--prompt", "x"],
        [str(root), "--image", str(images["wide"]), "--prompt", "x", "--raw-prompt"],
        [str(root), "--image", str(images["wide"]), "--prompt", "x", "--max-new-tokens", "5000"],
        [str(root), "--image", str(images["wide"]), "--prompt", "x", "--top-p", "0"],
    ]
    for argv in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_bad_arguments_exit_2(capsys):
    assert main(["bundle"]) == 2  # --image and --prompt are required
    assert "required" in capsys.readouterr().err


def test_module_entry_point_imports_no_heavy_packages(fake_bundle, images):
    """A real process: streams text, exits 0, and never imports torch, transformers or onnx."""
    root, _ = fake_bundle
    code = (
        "import sys, runpy; sys.argv = ['edgeprune_runtime'] + sys.argv[1:]\n"
        "try:\n    runpy.run_module('edgeprune_runtime', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    heavy = [m for m in ('torch', 'transformers', 'onnx') if m in sys.modules]\n"
        "    print('HEAVY', heavy, file=sys.stderr); raise\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(root), "--image", str(images["wide"]), "--prompt", "hi",
                           "--max-new-tokens", "3", "--json"], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(RUNTIME), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stderr
    assert json.loads(proc.stdout)["stop_reason"] in ("eos", "max_new_tokens")


def _runtime(args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgeprune_runtime", *args], capture_output=True, timeout=120,
                          env={"PYTHONPATH": str(RUNTIME), "PATH": "/usr/bin:/bin"}, **kw)


def _one_error_line(proc: subprocess.CompletedProcess, words: str) -> None:
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert words in err, err


def test_prompt_of_invalid_utf8_bytes_is_one_line(fake_bundle, images):
    """argv bytes that are not UTF-8 (`--prompt $'caf\\xc3'`) reach Python as lone surrogates."""
    root, _ = fake_bundle
    proc = _runtime([str(root), "--image", str(images["wide"]), "--prompt", b"caf\xc3"])
    _one_error_line(proc, "not valid UTF-8")


def test_a_closed_stdout_is_one_line(fake_bundle, images):
    """`... | head -c 1`: the reader goes away (a broken pipe), one error line and exit 2. `true` closes the pipe
    before the bundle has loaded, so the first write always meets a closed pipe (no race with the reader)."""
    root, _ = fake_bundle
    cmd = (f"{sys.executable} -m edgeprune_runtime {root} --image {images['wide']} --prompt hi --max-new-tokens 20 "
           "--temperature 1 2>err.txt | true; echo ${PIPESTATUS[0]} > rc.txt")
    work = Path(root).parent
    subprocess.run(["bash", "-c", cmd], cwd=work, timeout=120, env={"PYTHONPATH": str(RUNTIME), "PATH": "/usr/bin:/bin"})
    err = (work / "err.txt").read_text()
    assert (work / "rc.txt").read_text().strip() == "2", err
    assert err.startswith("error: cannot write to <stdout>") and err.count("\n") == 1, err


def test_ignore_eos_goes_on_past_eos(fake_bundle, images, capsys):
    """The id generated third is made the EOS id: without --ignore-eos generation stops there; with it, it goes on to
    --max-new-tokens with the same tokens before, and with --max-new-tokens 0 until the cache is full."""
    from fake_bundle import set_manifest

    root, _ = fake_bundle
    base = [str(root), "--image", str(images["wide"]), "--prompt", "hi", "--json"]

    def run(*extra):
        assert main(base + list(extra)) == 0
        return json.loads(capsys.readouterr().out)

    free = run("--max-new-tokens", "8")
    eos = free["token_ids"][2]
    first = free["token_ids"].index(eos)
    tok = json.loads((root / "manifest.json").read_text())["tokenizer"]
    set_manifest(root, tokenizer=tok | {"eos_token_ids": [eos]})
    stopped = run("--max-new-tokens", "8")
    assert stopped["stop_reason"] == "eos" and stopped["token_ids"] == free["token_ids"][:first + 1]
    going = run("--max-new-tokens", "8", "--ignore-eos")
    assert going["stop_reason"] == "max_new_tokens" and going["token_ids"] == free["token_ids"]
    full = run("--max-new-tokens", "0", "--ignore-eos")
    assert full["stop_reason"] == "cache_full" and full["cache_slots_used"] == json.loads(
        (root / "manifest.json").read_text())["shapes"]["cache_capacity"]
    assert full["token_ids"][:8] == free["token_ids"]


def test_exact_boundary_without_a_step_graph_is_one_error_line(fake_bundle, images, capsys):
    root, _ = fake_bundle  # exported without lm/step.onnx
    code = main([str(root), "--image", str(images["wide"]), "--prompt", "hi", "--exact-boundary"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and "step graph" in err[0]
