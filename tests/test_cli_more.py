"""More user-level checks: bench and sample-image, and user errors that must stay one `error:` line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EDGEPRUNE = Path(sys.executable).parent / "edgeprune"


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(EDGEPRUNE), *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd)


def one_error_line(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]


def test_bench_reports_both_sides_and_ratios(tmp_path):
    import onnxruntime

    result = cli("bench", "llava-next-tiny", "--budget", "0.2", "--max-new-tokens", "4", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for side in ("transformers", "edgeprune"):
        for key in ("ttft_s", "decode_tokens_per_s", "peak_rss_bytes"):
            assert report[side][key] > 0, (side, key)
    assert report["transformers"]["generated_tokens"] == report["edgeprune"]["generated_tokens"] == 4
    assert report["edgeprune"]["visual_tokens"] == 64  # K of the tiny twin at budget 0.2: 0.2 x 5 x 64
    assert report["strategy"] == "hired" and report["edgeprune"]["prefill_slots"] == 16 + 64 + 32
    assert set(report["ratios"]) == {"ttft_speedup", "decode_speedup", "peak_rss_ratio", "peak_rss_vs_weights_plus_cache"}
    # each worker reports its own peak: the bundle side never loads torch, so it stays well below the other
    assert report["edgeprune"]["peak_rss_bytes"] < report["transformers"]["peak_rss_bytes"]
    # where it ran, from sources other than the report's own code
    p = report["provenance"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert p["commit"] == head.stdout.strip()
    assert p["machine"]["cores"] == __import__("os").cpu_count()
    assert p["libraries"]["onnxruntime"] == onnxruntime.__version__
    assert p["command"].startswith("edgeprune bench llava-next-tiny --budget 0.2")


def test_bench_ratios(monkeypatch, small_bundle, tiny_recipe):
    """The ratios from hand-picked worker reports (no timing noise): 36 s vs 12 s to the first token is 3x."""
    from edgeprune import bench

    sides = {
        "transformers": {"ttft_s": 36.0, "decode_tokens_per_s": 6.0, "peak_rss_bytes": 8000},
        "bundle": {"ttft_s": 12.0, "decode_tokens_per_s": 9.0, "peak_rss_bytes": 2000, "weights_bytes": 1500,
                   "cache_bytes": 100},
    }
    monkeypatch.setattr(bench, "_child", lambda args: dict(sides[args[0]]))
    report = bench.run_bench("llava-next-tiny", tiny_recipe(0.5), None, 2, None, "hi", 4, str(small_bundle))
    assert report["ratios"] == {"ttft_speedup": 3.0, "decode_speedup": 1.5, "peak_rss_ratio": 0.25,
                                "peak_rss_vs_weights_plus_cache": 1.25}
    assert report["budget"] == 0.2 and report["strategy"] == "hired"  # the bundle's, not the recipe's 0.5


def test_bench_selection_cost(tmp_path):
    result = cli("bench", "llava-next-tiny", "--selection-cost", "hired,uniform", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["strategies"]) == {"hired", "uniform"} and report["no_selection_s"] > 0
    assert report["repeats"] == 3 and report["short_repeats"] == 15 and "provenance" in report


def test_selection_cost_arithmetic(monkeypatch, tiny_recipe):
    """overhead = (one-layer strategy - one-layer baseline) / full baseline, from scripted timings:
    full baseline 2.0 s, one-layer baseline 0.5 s, hired 0.45 s (-50 ms: -2.5%), uniform 0.6 s (+100 ms: +5%)."""
    from edgeprune import bench

    times = iter([2.0, 0.5, 0.45, 0.6])
    monkeypatch.setattr(bench, "_median_seconds", lambda session, feeds, repeats: next(times))
    report = bench.selection_cost("llava-next-tiny", tiny_recipe(0.2), ["hired", "uniform"], None, 2, None)
    hired, uniform = report["strategies"]["hired"], report["strategies"]["uniform"]
    assert hired["selection_s"] == pytest.approx(-0.05) and hired["overhead"] == pytest.approx(-0.025)
    assert uniform["selection_s"] == pytest.approx(0.1) and uniform["overhead"] == pytest.approx(0.05)


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "tiny"
    assert cli("export", "llava-next-tiny", "--budget", "0.2", "--out", out).returncode == 0
    return out


@pytest.mark.parametrize("args, pattern", [
    (["--max-new-tokens", "1"], "--max-new-tokens"),
    (["--image", "/nonexistent.png"], "nonexistent.png"),
    (["--bundle", "BUNDLE", "--budget", "0.2"], None),  # runs: a real bundle of the same model, flags as it was built
    (["--bundle", "BUNDLE", "--budget", "0.5"], "--budget shapes an export, but --bundle"),
    (["--bundle", "BUNDLE", "--prune-heads", "0.5", "--skip-decode", "4:1"], "leave out --prune-heads, --skip-decode or --bundle"),
])
def test_bench_bad_input(small_bundle, args, pattern):
    args = [str(small_bundle) if a == "BUNDLE" else a for a in args]
    result = cli("bench", "llava-next-tiny", *args, "--json")
    if pattern is None:
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["budget"] == 0.2  # the bundle's budget
    else:
        one_error_line(result, pattern)


def test_bench_refuses_a_bundle_of_another_model(small_bundle):
    one_error_line(cli("bench", "llava-next-7b-shape", "--bundle", small_bundle), "not 'llava-next-7b-shape'")


def test_sample_image(tmp_path):
    from PIL import Image

    assert cli("sample-image", tmp_path / "a.jpg", "--size", "320x200").returncode == 0
    assert Image.open(tmp_path / "a.jpg").size == (320, 200)


@pytest.mark.parametrize("args, pattern", [
    (["OUT/x.png", "--size", "-5x3"], "at least 1x1"),
    (["OUT/x.png", "--size", "big"], "--size must look like 640x480"),
    (["OUT/x.unknownext"], "cannot tell the image format"),
    (["OUT"], "is a directory"),
])
def test_sample_image_bad_input(tmp_path, args, pattern):
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    one_error_line(cli("sample-image", *args), pattern)
    assert list(tmp_path.iterdir()) == []


def test_export_out_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    one_error_line(cli("export", "llava-next-tiny", "--out", target), "is a file")
    assert target.read_text() == "x"


def test_inspect_out_is_a_directory(small_bundle, tmp_path):
    image = tmp_path / "i.png"
    assert cli("sample-image", image).returncode == 0
    one_error_line(cli("inspect", small_bundle, "--image", image, "--out", tmp_path), "is a directory")


@pytest.mark.parametrize("recipe, pattern", [
    ("seed = -1\nstrategy = 'random'\n", "seed must be >= 0"),
    ("[shapes]\ntext_slots_before_image = 8.5\n", "'shapes.text_slots_before_image' must be an integer"),
    ("budget = '0.2'\n", "'budget' must be a number"),
    ("alpha = true\n", "'alpha' must be a number"),
])
def test_recipe_value_types(tmp_path, recipe, pattern):
    path = tmp_path / "r.toml"
    path.write_text(recipe)
    one_error_line(cli("export", "llava-next-tiny", "--recipe", path, "--out", tmp_path / "b"), pattern)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("argv, pattern", [
    (["run", "BUNDLE", "--prompt", "hi"], "Missing option '--image'"),
    (["export", "llava-next-tiny", "--budget", "abc"], "'abc' is not a valid float"),
    (["nosuchcommand"], "No such command"),
])
def test_usage_errors_are_one_line(small_bundle, argv, pattern):
    one_error_line(cli(*[str(small_bundle) if a == "BUNDLE" else a for a in argv]), pattern)


def test_runtime_usage_error_is_one_line(small_bundle):
    result = subprocess.run([sys.executable, "-m", "edgeprune_runtime", str(small_bundle), "--prompt", "x"],
                            capture_output=True, text=True)
    one_error_line(result, "--image")


def test_bench_on_cuda_fails_here_before_exporting(tmp_path):
    """No GPU build of ONNX Runtime here: one line naming the extra, and no export started (nothing written)."""
    result = cli("bench", "llava-next-tiny", "--budget", "0.2", "--backend", "cuda", "--json")
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("error: ")] == [lines[-1]] and "Traceback" not in result.stderr
    assert "onnxruntime-gpu" in lines[-1] and "export" not in result.stderr.replace(lines[-1], "")


def test_bench_on_cuda_refuses_quantized_bundles(monkeypatch, tiny_recipe):
    from edgeprune import bench
    from edgeprune.errors import ConfigError
    from edgeprune_runtime.backends import select

    monkeypatch.setattr(select, "cuda_device", lambda: "9.0")
    with pytest.raises(ConfigError, match="int8 is a CPU quantization"):
        bench.check_backend("cuda", "int8")
