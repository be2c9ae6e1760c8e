"""`edgeprune calibrate` and `edgeprune export --prune-heads/--skip-layers/--stats/--report`, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

EDGEPRUNE = Path(sys.executable).with_name("edgeprune")


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(EDGEPRUNE), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)


def one_error_line(out: subprocess.CompletedProcess, fragment: str) -> None:
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], out.stderr


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    """(tmp dir, `calibrate --json` output) on a two-request JSONL of the user's own images."""
    from edgeprune.sample_image import write_sample_image

    root = tmp_path_factory.mktemp("cal")
    write_sample_image(root / "a.png", 320, 240)
    write_sample_image(root / "b.jpg", 200, 260)
    (root / "data.jsonl").write_text(json.dumps({"image": "a.png", "question": "What is red?", "answer": "cup"}) + "\n"
                                     + json.dumps({"image": "b.jpg", "question": "Colors?", "answer": "blue"}) + "\n")
    out = cli("calibrate", "llava-next-tiny", "--data", "data.jsonl", "--out", "stats/s.json", "--json", cwd=root)
    assert out.returncode == 0, out.stderr
    return root, json.loads(out.stdout)


def test_calibrate_writes_stats_and_heatmap(calibrated):
    root, report = calibrated
    stats = json.loads((root / "stats" / "s.json").read_text())
    assert report["samples"] == stats["samples"] == 2
    assert report["stats"] == "stats/s.json" and (root / "stats" / "s.png").read_bytes()[:4] == b"\x89PNG"
    lm = stats["lm"]
    assert len(lm["head_output_norm"]) == lm["num_layers"] == 2 and all(len(r) == lm["num_heads"] for r in lm["head_output_norm"])
    assert report["lm"]["block_influence"] == lm["block_influence"]
    assert sorted(p.name for p in (root / "stats").iterdir()) == ["s.json", "s.png"]  # no temporary files left


def test_export_with_stats_reports_before_and_after(calibrated):
    root, _ = calibrated
    out = cli("export", "llava-next-tiny", "--out", "b", "--prune-heads", "0.5", "--stats", "stats/s.json",
              "--skip-layers", "1", "--report", "--json", cwd=root)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)["report"]
    stats = json.loads((root / "stats" / "s.json").read_text())
    influence = stats["lm"]["block_influence"]
    assert [r["runs"] for r in report["layers"]["lm"]] == [v != min(influence) for v in influence]
    before, after = report["before"], report["after"]
    assert (before["lm_layers"], after["lm_layers"]) == (2, 1) and after["kv_heads"] == [1]
    assert after["kv_cache_bytes"] * 4 == before["kv_cache_bytes"]  # half the KV heads in half the layers
    assert after["flops"]["vision"] == before["flops"]["vision"] and after["flops"]["prefill"] < before["flops"]["prefill"]
    table = cli("export", "llava-next-tiny", "--out", "b2", "--skip-layers", "0,", "--report", cwd=root)
    assert table.returncode == 0, table.stderr
    assert "KV cache" in table.stdout and "skip-layers: layers [0] skipped, 1 of 2 run" in table.stdout


@pytest.mark.parametrize("flags,fragment", [
    (["--prune-heads", "1"], "must be a ratio in [0, 1)"),
    (["--prune-heads", "-0.5"], "must be a ratio in [0, 1)"),
    (["--prune-vision-heads", "1.5"], "prune_vision_heads (--prune-vision-heads) must be a ratio in [0, 1)"),
    (["--skip-layers", "two"], "--skip-layers takes a count N or layer indices"),
    (["--skip-layers", "0,1"], "would skip all 2 layers of the language model"),
    (["--skip-layers", "4,"], "there is no layer 4"),
    (["--skip-vision-layers", "3,"], "--skip-vision-layers: the vision tower (up to the feature layer) has layers 0..2"),
    (["--prune-heads", "0.5", "--stats", "missing.json"], "edgeprune calibrate"),
    (["--skip-decode", "64:2,32:1"], "is not monotone"),
    (["--skip-decode", "32:2,64:1"], "is not monotone"),
    (["--skip-decode", "32:0"], "skips at least 1 layer"),
    (["--skip-decode", "8:2"], "skip at most 1"),
    (["--skip-decode", "x"], "is not A:B with integers"),
    (["--drop-visual-after", "0:8,0:4"], "layers must increase and KEEP decrease"),
    (["--drop-visual-after", "0:4,1:8"], "layers must increase and KEEP decrease"),
    (["--drop-visual-after", "1:4"], "no layer follows layer 1"),
    (["--drop-visual-after", "0:100000"], "KEEP must be below that"),
    (["--drop-visual-after", "0:-1"], "is not A:B with integers >= 0"),
])
def test_bad_rewrite_flags_are_one_error_line_and_leave_nothing(tmp_path, flags, fragment):
    out = cli("export", "llava-next-tiny", "--out", "b", *flags, cwd=tmp_path)
    one_error_line(out, fragment)
    assert list(tmp_path.iterdir()) == []


def test_stats_of_another_model_are_refused(calibrated, tmp_path):
    root, _ = calibrated
    stats = json.loads((root / "stats" / "s.json").read_text())
    stats["lm"]["num_layers"] = 3
    stats["lm"]["head_output_norm"].append(stats["lm"]["head_output_norm"][0])
    stats["lm"]["head_first_token_mass"].append(stats["lm"]["head_first_token_mass"][0])
    stats["lm"]["head_visual_mass"].append(stats["lm"]["head_visual_mass"][0])
    stats["lm"]["block_influence"].append(0.5)
    (tmp_path / "other.json").write_text(json.dumps(stats))
    out = cli("export", "llava-next-tiny", "--out", "b", "--skip-layers", "1", "--stats", "other.json", cwd=tmp_path)
    one_error_line(out, "from another model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.json"]


def test_calibrate_bad_data_is_one_error_line(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "nope.png", "question": "q", "answer": "a"}) + "\n")
    one_error_line(cli("calibrate", "llava-next-tiny", "--data", "d.jsonl", cwd=tmp_path), "cannot read image")
    one_error_line(cli("calibrate", "llava-next-tiny", "--data", "missing.jsonl", cwd=tmp_path), "does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
