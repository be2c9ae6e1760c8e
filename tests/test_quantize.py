"""--precision int8 / int4 on the tiny twin: ONNX Runtime's quantizers, fp32 selection scoring, weights once,
drift against the fp32 bundle and eager PyTorch, and the targets that must refuse these bundles."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import cli


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny, tiny_recipe):
    """precision -> a tiny bundle at budget 0.2 exported with it (cached per module)."""
    from edgeprune.export import export_bundle

    root = tmp_path_factory.mktemp("quantized")
    made = {}

    def make(precision: str) -> Path:
        if precision not in made:
            made[precision] = export_bundle("llava-next-tiny", root / precision,
                                            tiny_recipe(0.2).override(precision=precision), loaded=tiny)
        return made[precision]

    return make


@pytest.fixture(scope="module")
def sample_png(tmp_path_factory):
    from edgeprune.sample_image import write_sample_image

    return str(write_sample_image(tmp_path_factory.mktemp("img") / "table.png", 320, 240))


def _graph(bundle: Path, rel: str):
    import onnx

    return onnx.load(str(bundle / rel), load_external_data=False)


def _ops(bundle: Path, rel: str) -> Counter:
    return Counter(n.op_type for n in _graph(bundle, rel).graph.node)


def _weight_matmuls(model) -> list:
    """MatMul nodes whose B is an initializer (a weight): the ones a weight quantizer must replace."""
    inits = {t.name for t in model.graph.initializer}
    return [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]


@pytest.mark.parametrize("precision, graph, lm_op", [
    *[("int8", g, "MatMulInteger") for g in ("prefill", "decode", "step")],
    *[("int4", g, "MatMulNBits") for g in ("prefill", "decode", "step")]])
def test_quantized_graph_forms(bundles, precision, graph, lm_op):
    fp32, q = bundles("fp32"), bundles(precision)
    for rel in (f"lm/{graph}.onnx",):
        # every weight MatMul of the fp32 LM graph became the quantized op; none is left in fp32
        assert _ops(q, rel)[lm_op] == len(_weight_matmuls(_graph(fp32, rel))) > 0
        assert _weight_matmuls(_graph(q, rel)) == []
    vision32, vision = _graph(fp32, "vision/vision.onnx"), _graph(q, "vision/vision.onnx")
    assert Counter(n.op_type for n in vision.graph.node)["MatMulInteger"] > 0
    # The selection-scoring projections (cls_attention, outside every module scope) stay fp32 MatMuls with
    # the same fp32 weights; every other weight MatMul of the tower is quantized.
    scoring32 = {n.name for n in _weight_matmuls(vision32) if not n.name.startswith(("/layers.", "/projector/"))}
    assert scoring32 and {n.name for n in _weight_matmuls(vision)} == scoring32
    manifest = json.loads((q / "manifest.json").read_text())
    assert manifest["onnx"]["precision"] == precision
    assert set(manifest["onnx"]["quantized"]["vision"]["fp32_nodes"]) >= scoring32


def test_fp32_export_has_no_quantization(bundles):
    b = bundles("fp32")
    for rel in ("vision/vision.onnx", "lm/prefill.onnx", "lm/decode.onnx"):
        assert not {"MatMulInteger", "MatMulNBits", "DynamicQuantizeLinear"} & set(_ops(b, rel))
    assert "quantized" not in json.loads((b / "manifest.json").read_text())["onnx"]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_lm_weights_are_stored_once(bundles, precision):
    """Every tensor is in lm.weights once (unique names, unique contents, no bytes beyond them but alignment),
    and prefill, step and decode read the same tensors: one quantized copy of every LM weight, whatever the
    precision. The file is smaller than the fp32 LM's by the quantized form's ratio."""
    import hashlib

    q, fp32 = bundles(precision), bundles("fp32")
    index = json.loads((q / "lm" / "lm.weights.json").read_text())["tensors"]
    names = [t["name"] for t in index]
    assert len(names) == len(set(names))
    data = (q / "lm" / "lm.weights").read_bytes()
    digests = [hashlib.sha256(data[t["offset"]:t["offset"] + t["length"]] + t["dtype"].encode()
                              + str(t["shape"]).encode()).hexdigest() for t in index]
    assert len(digests) == len(set(digests))
    external = {}
    for rel in ("lm/prefill.onnx", "lm/decode.onnx", "lm/step.onnx"):
        external[rel] = {t.name for t in _graph(q, rel).graph.initializer if t.data_location == 1}
        assert external[rel] <= set(names)
    assert external["lm/prefill.onnx"] == external["lm/step.onnx"] == external["lm/decode.onnx"]
    stored = sum(t["length"] for t in index)
    assert stored <= len(data) < stored + 64 * len(index)
    # Expected size from the fp32 LM: each weight matmul's fp32 B [K, N] becomes its quantized form
    # (int8: N*K bytes; int4: N*ceil(K/128)*64 packed bytes + N*ceil(K/128) fp32 scales), the rest stays.
    fp32_model = _graph(fp32, "lm/decode.onnx")
    fp32_index = {t["name"]: t for t in json.loads((fp32 / "lm" / "lm.weights.json").read_text())["tensors"]}
    quantized = {n.input[1] for n in _weight_matmuls(fp32_model)} & set(fp32_index)
    expected = sum(t["length"] for name, t in fp32_index.items() if name not in quantized)
    for name in quantized:
        k, n = fp32_index[name]["shape"]
        blocks = -(-k // 128)
        expected += n * k if precision == "int8" else n * blocks * 64 + n * blocks * 4
    assert abs(stored - expected) <= 4 * 64 * len(index) + 4 * len(quantized) * 1024, (stored, expected)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_bundle_runs_with_exact_budget_and_small_drift(bundles, sample_png, precision):
    """Against the fp32 bundle (ONNX Runtime fp32, the reference): the same number of visual tokens (K exact),
    logits of the first token close in cosine (the floors compare uses), greedy agreement reported."""
    from edgeprune.compare import COSINE_FLOORS
    from edgeprune.drift import bundle_drift
    from edgeprune_runtime import Bundle

    fp32, q = bundles("fp32"), bundles(precision)
    with Bundle(q) as b, Bundle(fp32) as r:
        got, ref = b.generate(sample_png, "What is on the table?", 6), r.generate(sample_png, "What is on the table?", 6)
    assert got.visual_tokens == ref.visual_tokens > 0
    assert len(got.token_ids) == 6
    drift = bundle_drift(str(q), str(fp32), sample_png, "What is on the table?", max_new_tokens=6)
    assert drift.tokens == 6 and 0 <= drift.agreed <= 6
    assert drift.cosines[0] >= COSINE_FLOORS[precision]


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_compare_passes_on_the_precisions_floor(bundles, sample_png, precision):
    from edgeprune.compare import COSINE_FLOORS, compare_bundle

    report = compare_bundle(bundles(precision), sample_png)
    assert report.cosine_floor == COSINE_FLOORS[precision]
    assert report, [r for r in report.rows if not r.passed]
    embeds = next(r for r in report.rows if r.output == "visual_embeds")
    assert 0.9 < embeds.cosine < 1.0  # quantized: drift is real, and measured
    assert {r.stage for r in report.rows} >= {"vision", "prefill", "decode"}


def test_cosine_is_the_textbook_formula():
    from edgeprune.compare import cosine

    a, b = np.array([1.0, 2.0, 2.0]), np.array([2.0, 0.0, 1.0])
    assert cosine(a, b) == pytest.approx(4 / (3 * np.sqrt(5)))
    assert cosine(np.zeros(3), np.zeros(3)) == 1.0 and cosine(np.zeros(3), a) == 0.0


# --- targets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("target, precision", [("p40", "int4"), ("rtx", "int4"), ("jetson-orin-jp61", "int4")])
def test_export_for_a_tensorrt_target_refuses_cpu_only_precisions(target, precision, tmp_path):
    out = cli("export", "llava-next-tiny", "--target", target, "--precision", precision, "--out", tmp_path / "b")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert lines[0].startswith(f"error: target {target} cannot run {precision.upper()}")
    assert "CPU only" in lines[0] and "--precision fp32 or fp16" in lines[0]
    assert not (tmp_path / "b").exists()


def test_export_refuses_int4_and_fp16_on_p40_in_one_line():
    out = cli("export", "llava-next-tiny", "--target", "p40", "--precision", "fp16", "--out", "/nonexistent/x")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "FP16" in out.stderr


@pytest.mark.parametrize("precision, op", [("int4", "com.microsoft::MatMulNBits"), ("int8", "MatMulInteger")])
def test_check_says_quantized_bundles_are_onnx_runtime_only(bundles, precision, op):
    b = bundles(precision)
    out = cli("check", b, "--target", "rtx", "--json", "--no-parser")
    assert out.returncode == 1, out.stderr
    errors = [f["message"] for f in json.loads(out.stdout)["findings"] if f["severity"] == "error"]
    assert any(m.startswith(f"{precision.upper()} bundles run on ONNX Runtime (CPU) only") for m in errors), errors
    assert any(op in m for m in errors), errors


# --- bench and sweep axes -----------------------------------------------------------------------


def test_bench_reports_precision_and_per_stage_time(bundles):
    out = cli("bench", "llava-next-tiny", "--bundle", bundles("int4"), "--max-new-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["precision"] == "int4" and report["vision_keep"] == ""
    stages = report["edgeprune"]["timings"]
    assert all(stages[k] > 0 for k in ("vision_s", "prefill_s"))
    assert stages["vision_s"] + stages["prefill_s"] <= report["edgeprune"]["ttft_s"]


def test_sweep_over_precisions_reports_drift_against_fp32(tmp_path, sample_png):
    from edgeprune.compare import COSINE_FLOORS
    from edgeprune.recipe import load_recipe
    from edgeprune.sweep import run_sweep

    base = load_recipe(Path(__file__).resolve().parents[1] / "edgeprune" / "recipes" / "llava-next-tiny.toml")
    report = run_sweep("llava-next-tiny", base, ["hired"], [0.2], tmp_path / "sw", image=sample_png,
                       max_new_tokens=4, precisions=["fp32", "int8"])
    rows = {r["precision"]: r for r in report["rows"]}
    assert set(rows) == {"fp32", "int8"} and "drift" not in rows["fp32"]
    drift = rows["int8"]["drift"]
    assert drift["tokens"] == 4 and drift["logit_cosine_min"] <= 1.0
    assert drift["logit_cosine_mean"] >= drift["logit_cosine_min"] >= COSINE_FLOORS["int8"] - 0.05
    assert rows["int8"]["bundle"].endswith("hired-0.2-int8") and rows["fp32"]["bundle"].endswith("hired-0.2")
    assert rows["int8"]["timings"]["vision_s"] > 0


@pytest.mark.parametrize("precision", ["fp32", "int8", "int4"])
def test_runtime_runs_quantized_lms_in_one_prepacked_session(bundles, precision, monkeypatch):
    """Quantized bundles: prefill and decode both run the step graph in one prepacked session (ORT packs
    per session: two sessions would hold two packed copies); fp32 bundles keep two unpacked sessions
    over the shared map."""
    from edgeprune_runtime.engine import Engine
    from edgeprune_runtime.manifest import load_manifest

    monkeypatch.delenv("EDGEPRUNE_LM_PREPACK", raising=False)
    eng = Engine(load_manifest(bundles(precision)))

    def prepacking(session) -> bool:
        try:
            return session.get_session_options().get_session_config_entry("session.disable_prepacking") != "1"
        except RuntimeError:  # never set: ORT's default, on
            return True

    if precision == "fp32":
        assert eng.step is None and eng.prefill is not eng.decode
        assert (prepacking(eng.prefill), prepacking(eng.decode)) == (False, False)
    else:
        assert eng.backend.name == "cpu" and eng.backend.lm == "step"
        assert eng.prefill is None and eng.decode is None and prepacking(eng.step)


def _prefill_inputs(s):
    """Random prefill inputs with padding where a bug would show: 5 of the text-before slots, 7 of the text-after
    slots and all but the last 3 visual slots valid -> (text_ids, text_valid, visual_embeds, visual_valid)."""
    rng = np.random.default_rng(1)
    t = s.text_slots_before_image + s.text_slots_after_image
    text_ids = rng.integers(3, s.vocab_size, t).astype(np.int64)
    text_valid = (np.arange(t) < 5).astype(np.float32) + (np.arange(t) >= s.text_slots_before_image) * (
        np.arange(t) < s.text_slots_before_image + 7)
    text_valid = text_valid.astype(np.float32)
    embeds = rng.standard_normal((s.visual_slots, s.hidden_size)).astype(np.float32)
    visual_valid = np.ones(s.visual_slots, np.float32)
    visual_valid[-3:] = 0
    return text_ids, text_valid, embeds, visual_valid


def _prefill_reference(bundle: Path, text_ids, text_valid, embeds, visual_valid) -> dict:
    """ONNX Runtime on the bundle's own prefill.onnx (same quantized weights): output name -> array."""
    import onnxruntime as ort

    prefill = ort.InferenceSession(str(bundle / "lm" / "prefill.onnx"))
    out = prefill.run(None, {"text_ids": text_ids, "text_valid": text_valid, "visual_embeds": embeds,
                             "visual_valid": visual_valid})
    return dict(zip([o.name for o in prefill.get_outputs()], out))


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_one_step_session_matches_the_prefill_and_decode_graphs(bundles, sample_png, precision):
    """The reference is ONNX Runtime on the bundle's own prefill.onnx / decode.onnx (same quantized weights):
    the step session's prefill logits and K/V and its next decode step agree with them."""
    import onnxruntime as ort

    from edgeprune_runtime.engine import Engine
    from edgeprune_runtime.manifest import load_manifest
    from edgeprune_runtime.kvcache import prefill_slot_valid

    q = bundles(precision)
    m = load_manifest(q)
    eng = Engine(m)
    s = m.shapes
    text_ids, text_valid, embeds, visual_valid = _prefill_inputs(s)
    logits, keys, values, slot_valid = eng.run_prefill(text_ids, text_valid, embeds, visual_valid)
    ref = _prefill_reference(q, text_ids, text_valid, embeds, visual_valid)
    np.testing.assert_allclose(logits, ref["logits"], atol=2e-3, rtol=1e-3)
    valid = prefill_slot_valid(text_valid, visual_valid, s.text_slots_before_image) > 0.5
    assert all(np.array_equal(v > 0.5, valid) for v in slot_valid)
    for i in range(s.num_layers):  # padding slots' K/V are never read; the Buffers are host memory on the CPU
        np.testing.assert_allclose(keys[i].host[:, valid], ref[f"key_{i}"][:, valid], atol=2e-3, rtol=1e-3)
        np.testing.assert_allclose(values[i].host[:, valid], ref[f"value_{i}"][:, valid], atol=2e-3, rtol=1e-3)

    cache = eng.new_cache()
    n = cache.fill_from_prefill(keys, values, valid.astype(np.float32))
    token = int(np.argmax(logits))
    decode = ort.InferenceSession(str(q / "lm" / "decode.onnx"))
    feed = {"token_id": np.array([token], np.int64), "position": np.array([n], np.int64), "cache_valid": cache.valid[0].copy()}
    for i in range(s.num_layers):
        feed[f"past_key_{i}"], feed[f"past_value_{i}"] = cache.keys[i].copy(), cache.values[i].copy()
    ref = dict(zip([o.name for o in decode.get_outputs()], decode.run(None, feed)))
    got = eng.decoder(cache).step(token)
    np.testing.assert_allclose(got, ref["logits"], atol=2e-3, rtol=1e-3)
    np.testing.assert_allclose(cache.keys[0][:, n], ref["new_key_0"][:, 0], atol=2e-3, rtol=1e-3)


def test_cpu_prefill_runs_in_steps_of_a_few_slots_and_fills_the_cache_as_the_prefill_graph(bundles, monkeypatch):
    """The CPU backend's step prefill (Engine.start) feeds the prompt's valid slots in steps of at most
    CPU_PREFILL_CHUNK, or EDGEPRUNE_PREFILL_CHUNK (so a step's attention tensors are [H, chunk, C + chunk], not [H, S, C + S]); the reference is
    ONNX Runtime on the bundle's own prefill.onnx over all S slots at once: same logits, and the cache holds its
    valid slots' K/V, compacted, in order."""
    import dataclasses

    from edgeprune_runtime.backends import select
    from edgeprune_runtime.engine import Engine
    from edgeprune_runtime.errors import RuntimeStatusError
    from edgeprune_runtime.kvcache import prefill_slot_valid
    from edgeprune_runtime.manifest import load_manifest

    q = bundles("int4")
    m = load_manifest(q)
    s = m.shapes
    monkeypatch.delenv("EDGEPRUNE_PREFILL_CHUNK", raising=False)
    assert select.cpu_backend(m).prefill_chunk == select.CPU_PREFILL_CHUNK > 0
    monkeypatch.setenv("EDGEPRUNE_PREFILL_CHUNK", "-1")
    with pytest.raises(RuntimeStatusError, match="EDGEPRUNE_PREFILL_CHUNK=-1 must be >= 0"):
        select.cpu_backend(m)
    chunk = 5  # the 73 valid slots of these inputs in 15 steps (the default, 128, would take one)
    monkeypatch.setenv("EDGEPRUNE_PREFILL_CHUNK", str(chunk))
    eng = Engine(m)
    assert eng.backend.lm == "step" and eng.backend.prefill_chunk == chunk
    steps = []
    run_bound = eng._run_bound

    def spy(session, what, inputs, *rest):
        steps.append(len(inputs["token_ids"]))
        return run_bound(session, what, inputs, *rest)

    monkeypatch.setattr(eng, "_run_bound", spy)
    inputs = _prefill_inputs(s)
    cache = eng.new_cache()
    cache.fill_from_prefill(*eng.run_prefill(*inputs)[1:3], np.ones(s.prefill_slots, np.float32))  # an earlier request
    steps.clear()
    logits, same = eng.start(*inputs, cache=cache)
    assert same is cache
    valid = prefill_slot_valid(inputs[1], inputs[3], s.text_slots_before_image) > 0.5
    n = int(valid.sum())
    assert steps == [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])
    ref = _prefill_reference(q, *inputs)
    np.testing.assert_allclose(logits, ref["logits"], atol=2e-3, rtol=1e-3)
    assert cache.length == n and cache.lengths == [n] * s.num_layers
    for i in range(s.num_layers):
        np.testing.assert_array_equal(cache.valid[i], np.arange(s.cache_capacity) < n)
        np.testing.assert_allclose(cache.keys[i][:, :n], ref[f"key_{i}"][:, valid], atol=2e-3, rtol=1e-3)
        np.testing.assert_allclose(cache.values[i][:, :n], ref[f"value_{i}"][:, valid], atol=2e-3, rtol=1e-3)
    one_call = Engine(m, dataclasses.replace(eng.backend, prefill_chunk=0))  # the GPU backends' one call over S slots
    np.testing.assert_allclose(one_call.start(*inputs)[0], logits, atol=1e-5, rtol=1e-5)


def test_a_step_graph_that_breaks_the_contract_is_refused_in_one_line(bundles):
    """The one-session path checks the step graph against the manifest's shapes like the two-session path
    checks prefill/decode: a cache capacity the graph does not have is BUNDLE_INVALID naming the input."""
    import dataclasses

    from edgeprune_runtime.engine import Engine
    from edgeprune_runtime.errors import RuntimeStatusError, Status
    from edgeprune_runtime.manifest import load_manifest

    m = load_manifest(bundles("int4"))
    m = dataclasses.replace(m, shapes=dataclasses.replace(m.shapes, cache_capacity=m.shapes.cache_capacity + 1))
    with pytest.raises(RuntimeStatusError) as e:
        Engine(m)
    assert e.value.status == Status.BUNDLE_INVALID and "step graph input 'cache_valid'" in str(e.value), str(e.value)


def test_the_step_runner_of_a_quantized_bundle_is_the_engines_session(bundles):
    """Follow-ups and exact boundaries run the step graph too (step.StepRunner): on an int4 bundle the Engine's own
    step session (one packed copy of the weights), on fp32 a session of its own over the shared map."""
    from edgeprune_runtime.engine import Engine
    from edgeprune_runtime.manifest import load_manifest
    from edgeprune_runtime.step import StepRunner

    quantized, fp32 = Engine(load_manifest(bundles("int4"))), Engine(load_manifest(bundles("fp32")))
    assert StepRunner(quantized).session is quantized.step is not None
    assert fp32.step is None and StepRunner(fp32).session is not None
