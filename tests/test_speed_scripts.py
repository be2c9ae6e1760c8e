"""The measuring scripts behind README "Speed": bundle_drift.py, peak_memory.py, genai_side_by_side.py (opt-in:
`pytest -m genai`), on tiny bundles; their refusals are one `error:` line and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def script(name: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / name), *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny, tiny_recipe):
    from edgeprune.export import export_bundle

    root = tmp_path_factory.mktemp("speed")
    return {p: export_bundle("llava-next-tiny", root / p, tiny_recipe(0.2).override(precision=p), loaded=tiny)
            for p in ("fp32", "int4")}


def test_bundle_drift_of_a_bundle_against_itself_is_none(bundles):
    """Independent expectation: the same bundle twice answers identically (cosine 1, every token agreed)."""
    out = script("bundle_drift.py", bundles["int4"], bundles["int4"], "--max-new-tokens", "3")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["greedy_agreement"] == 1.0 and r["logit_cosine_min"] == pytest.approx(1.0, abs=1e-6)
    assert [q["tokens"] for q in r["requests"]] == [3, 3, 3] and r["provenance"]["commit"]


def test_bundle_drift_of_int4_stays_above_its_compare_floor(bundles):
    from edgeprune.compare import COSINE_FLOORS

    out = script("bundle_drift.py", bundles["int4"], bundles["fp32"], "--max-new-tokens", "3")
    r = json.loads(out.stdout)
    assert r["bundle"]["precision"] == "int4" and r["reference"]["precision"] == "fp32"
    assert COSINE_FLOORS["int4"] <= r["logit_cosine_min"] < 1.0


def test_peak_memory_reports_the_default_then_the_arena_with_stages(bundles):
    out = script("peak_memory.py", bundles["int4"], "--max-new-tokens", "3", "--stages")
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    settings = ["default", "arena_on", "prefill_one_call"]
    assert [k for k in r if k in settings] == settings and r["same_tokens"] is True
    names = ["imports", "session vision", "session step", "bundle loaded", "vision", "prefill", "decode (3 tokens)"]
    for key in settings:
        run = r[key]
        assert run["generated_tokens"] == 3
        assert run["peak_rss_vs_weights_plus_cache"] == pytest.approx(
            run["peak_rss_bytes"] / (run["weights_bytes"] + run["cache_bytes"]))
        assert [st["stage"] for st in run["stages"]] == names
        # each stage's peak is its own (reset before it), at least what it leaves resident: anon + file (+ shmem)
        assert all(st["peak"] >= st["rss"] >= st["anon"] + st["file"] > 0 for st in run["stages"])


def test_scripts_refuse_bad_inputs_in_one_line(bundles, tmp_path):
    for out in (script("peak_memory.py", tmp_path),
                script("bundle_drift.py", bundles["int4"], tmp_path / "missing"),
                script("genai_side_by_side.py", "--int4-bundle", bundles["fp32"], "--fp32-bundle", bundles["fp32"],
                       "--work", tmp_path / "w")):
        lines = out.stderr.strip().splitlines()
        assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.genai
def test_genai_side_by_side_on_the_tiny_twin(bundles, tmp_path, request):
    if "genai" not in (request.config.option.markexpr or ""):
        pytest.skip("opt-in (builds an onnxruntime-genai model, ~30 s): pytest -m genai tests/test_speed_scripts.py")
    pytest.importorskip("onnxruntime_genai", reason="pip install -e '.[genai]'")
    out = script("genai_side_by_side.py", "--int4-bundle", bundles["int4"], "--fp32-bundle", bundles["fp32"],
                 "--work", tmp_path / "w", "--max-new-tokens", "4", timeout=600)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert r["checkpoint"]["layers"] == 2 and r["onnxruntime_genai"]["generated_tokens"] == 4
    # the peer decodes over as many cached tokens as our int4 bundle had after prefill
    assert r["onnxruntime_genai"]["context_tokens"] == r["edgeprune_int4"]["context_tokens"] > 0
    for side in ("onnxruntime_genai", "edgeprune_int4", "edgeprune_fp32"):
        assert r[side]["decode_tokens_per_s"] > 0
    assert r["ratios"]["int4_vs_fp32_bundle"] == pytest.approx(
        r["edgeprune_int4"]["decode_tokens_per_s"] / r["edgeprune_fp32"]["decode_tokens_per_s"])
    assert (tmp_path / "w" / "hf" / "config.json").is_file() and (tmp_path / "w" / "genai-int4" / "genai_config.json").is_file()
