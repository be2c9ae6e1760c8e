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
    result = cli("bench", "llava-next-tiny", "--budget", "0.2", "--max-new-tokens", "4", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for side in ("transformers", "edgeprune"):
        for key in ("ttft_s", "decode_tokens_per_s", "peak_rss_bytes"):
            assert report[side][key] > 0, (side, key)
    assert report["transformers"]["generated_tokens"] == report["edgeprune"]["generated_tokens"] == 4
    assert report["edgeprune"]["visual_tokens"] == 64  # K of the tiny twin at budget 0.2
    r = report["ratios"]
    assert r["ttft_speedup"] == pytest.approx(report["transformers"]["ttft_s"] / report["edgeprune"]["ttft_s"])
    assert r["decode_speedup"] == pytest.approx(
        report["edgeprune"]["decode_tokens_per_s"] / report["transformers"]["decode_tokens_per_s"])
    # each worker reports its own peak: the bundle side never loads torch, so it stays well below the other
    assert report["edgeprune"]["peak_rss_bytes"] < report["transformers"]["peak_rss_bytes"]


def test_bench_selection_cost(tmp_path):
    result = cli("bench", "llava-next-tiny", "--selection-cost", "hired,uniform", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report["strategies"]) == {"hired", "uniform"} and report["no_selection_s"] > 0
    for r in report["strategies"].values():
        assert r["overhead"] == pytest.approx(r["selection_s"] / report["no_selection_s"])


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("b") / "tiny"
    assert cli("export", "llava-next-tiny", "--budget", "0.2", "--out", out).returncode == 0
    return out


@pytest.mark.parametrize("args, pattern", [
    (["--max-new-tokens", "1"], "--max-new-tokens"),
    (["--image", "/nonexistent.png"], "nonexistent.png"),
    (["--bundle", "BUNDLE", "--budget", "0.5"], None),  # runs: a real bundle of the same model
])
def test_bench_bad_input(small_bundle, args, pattern):
    args = [str(small_bundle) if a == "BUNDLE" else a for a in args]
    result = cli("bench", "llava-next-tiny", *args, "--json")
    if pattern is None:
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["budget"] == 0.2  # the bundle's budget, not the flag's
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
