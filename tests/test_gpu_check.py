"""scripts/gpu_check.py on this machine (no GPU): its refusal, and its whole tiny-twin flow with the CPU standing in."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def test_without_a_gpu_build_it_stops_with_the_runtime_refusal(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--out", out], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert "onnxruntime-gpu" in proc.stderr and "--dry-run" in proc.stderr
    assert not out.exists()


def test_dry_run_compares_the_tiny_twin_and_records_it(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", out, "--max-new-tokens", "6"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["backend_under_test"] == "cpu" and report["tiny_equal"] is True
    rows = report["tiny_budget_1.0"]
    assert set(rows) == {"photo", "wide", "tall"}
    for row in rows.values():
        assert row["under_test"] == row["cpu"] and len(row["cpu"]) >= 1 and row["backend_reported"] == "cpu"
        assert row["shared_prefix"] == row["tokens"] == len(row["cpu"])
    assert "provenance" in report and "7b_shape_budget_0.2" not in report


def test_agreement_is_the_shared_prefix():
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    assert gpu_check.agreement([1, 2, 3], [1, 2, 3]) == {"equal": True, "shared_prefix": 3, "tokens": 3}
    assert gpu_check.agreement([1, 2, 3, 4], [1, 2, 9, 4]) == {"equal": False, "shared_prefix": 2, "tokens": 4}
    assert gpu_check.agreement([1, 2], [1, 2, 5]) == {"equal": False, "shared_prefix": 2, "tokens": 3}
    report = {"edgeprune": {"decode_gb_per_s": 1675.0}}
    assert gpu_check.bandwidth_fraction(report, "NVIDIA H100 80GB HBM3", None)["fraction"] == 0.5
    assert gpu_check.bandwidth_fraction(report, "unknown", None)["fraction"] is None
