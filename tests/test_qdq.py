"""TensorRT INT8 (`export --target T --precision int8`): Q/DQ graphs from ONNX Runtime's static quantizer that
`check` accepts, TensorRT-RTX's parser and builder build (marker `tensorrt`), ONNX Runtime runs within the INT8
cosine floor of eager PyTorch, while the CPU's dynamic INT8 and INT4 stay refused for TensorRT targets."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import cli, needs_rtx


GRAPHS = ("vision/vision.onnx", "lm/prefill.onnx", "lm/decode.onnx", "lm/step.onnx")


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, tiny, tiny_recipe):
    """(target, precision) -> a tiny bundle at budget 0.2 exported for them (cached per module)."""
    from edgeprune.export import export_bundle
    from edgeprune.trt.forms import resolve_for_target

    root = tmp_path_factory.mktemp("qdq")
    made = {}

    def make(target: str | None, precision: str) -> Path:
        if (target, precision) not in made:
            recipe = resolve_for_target(tiny_recipe(0.2).override(precision=precision, target=target), False)
            made[target, precision] = export_bundle("llava-next-tiny", root / f"{target}-{precision}", recipe, loaded=tiny)
        return made[target, precision]

    return make


@pytest.fixture(scope="module")
def sample_png(tmp_path_factory):
    from edgeprune.sample_image import write_sample_image

    return str(write_sample_image(tmp_path_factory.mktemp("img") / "table.png", 320, 240))


def _graph(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=True)


@pytest.mark.parametrize("rel", GRAPHS)
def test_every_weight_matmul_becomes_a_symmetric_qdq_pair(bundles, rel):
    """Read from the graphs themselves: each fp32 weight MatMul now takes DequantizeLinear(int8 weight, per
    output channel, zero point 0) and DequantizeLinear(QuantizeLinear(activation), zero point 0); no ONNX
    Runtime-only op is left. The vision graph's selection-scoring matmuls keep their fp32 weights."""
    from onnx import numpy_helper

    fp32, qdq = _graph(bundles(None, "fp32") / rel), _graph(bundles("jetson-orin-jp61", "int8") / rel)
    inits32 = {t.name for t in fp32.graph.initializer}
    weight_mms = {n.name for n in fp32.graph.node if n.op_type == "MatMul" and n.input[1] in inits32}
    scoring = {n for n in weight_mms if not n.startswith(("/layers.", "/projector/"))} if rel.startswith("vision") else set()
    assert weight_mms and (not rel.startswith("vision") or scoring)
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}
    ops = Counter(n.op_type for n in qdq.graph.node)
    assert not {"MatMulInteger", "DynamicQuantizeLinear", "MatMulNBits"} & set(ops)
    quantized = 0
    for node in qdq.graph.node:
        if node.op_type != "MatMul" or node.name not in weight_mms:
            continue
        if node.name in scoring:
            assert node.input[1] in inits and inits[node.input[1]].dtype == np.float32
            continue
        a, b = producer.get(node.input[0]), producer.get(node.input[1])
        assert b is not None and b.op_type == "DequantizeLinear" and inits[b.input[0]].dtype == np.int8
        weight, scale = inits[b.input[0]], inits[b.input[1]]
        assert scale.shape == (weight.shape[1],)  # per output channel of W [K, N]
        assert not inits[b.input[2]].any() if len(b.input) > 2 else True
        assert a is not None and a.op_type == "DequantizeLinear" and producer[a.input[0]].op_type == "QuantizeLinear"
        assert inits[a.input[1]].shape == () and (len(a.input) < 3 or not inits[a.input[2]].any())  # per tensor, symmetric
        quantized += 1
    assert quantized == len(weight_mms) - len(scoring)


def test_manifest_records_the_qdq_form(bundles):
    m = json.loads((bundles("jetson-orin-jp61", "int8") / "manifest.json").read_text())
    assert m["onnx"]["precision"] == "int8" and m["onnx"]["target"] == "jetson-orin-jp61"
    assert {g: q["form"] for g, q in m["onnx"]["quantized"].items()} == dict.fromkeys(("vision", "prefill", "decode", "step"), "qdq")


@pytest.mark.parametrize("target", ["jetson-orin-jp61", "p40"])
def test_check_accepts_qdq_bundles_on_int8_targets(bundles, target):
    """The bundle exported for Orin also suits the P40 (opset 17, no target-specific pass): check says so."""
    out = cli("check", bundles("jetson-orin-jp61", "int8"), "--target", target, "--json", "--no-parser")
    assert out.returncode == 0, out.stdout + out.stderr
    assert not [f for f in json.loads(out.stdout)["findings"] if f["severity"] == "error"]


def test_check_still_refuses_the_cpu_int8_bundle_on_p40(bundles):
    out = cli("check", bundles(None, "int8"), "--target", "p40", "--json", "--no-parser")
    errors = [f["message"] for f in json.loads(out.stdout)["findings"] if f["severity"] == "error"]
    assert out.returncode == 1 and any(m.startswith("INT8 bundles run on ONNX Runtime (CPU) only, not on p40") and
                                       "--target T --precision int8" in m for m in errors), errors


def test_int4_stays_refused_for_tensorrt_targets(tmp_path):
    out = cli("export", "llava-next-tiny", "--target", "jetson-orin-jp61", "--precision", "int4", "--out", tmp_path / "b")
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "MatMulNBits" in out.stderr
    assert not (tmp_path / "b").exists()


def test_qdq_bundle_compares_within_the_int8_floor_and_runs(bundles, sample_png):
    from edgeprune.compare import COSINE_FLOORS, compare_bundle
    from edgeprune_runtime import Bundle

    b = bundles("jetson-orin-jp61", "int8")
    report = compare_bundle(b, sample_png)
    assert report.cosine_floor == COSINE_FLOORS["int8"] and report, [r for r in report.rows if not r.passed]
    assert {r.stage for r in report.rows} >= {"vision", "prefill", "decode", "step"}
    assert min(r.cosine for r in report.rows if r.output == "logits") < 1.0  # quantized: the drift is real
    with Bundle(b) as run, Bundle(bundles(None, "fp32")) as ref:
        got, want = run.generate(sample_png, "What is on the table?", 4), ref.generate(sample_png, "What is on the table?", 4)
    assert got.visual_tokens == want.visual_tokens and len(got.token_ids) == 4


def test_calibration_feeds_follow_the_static_shapes(bundles, tiny, tiny_recipe):
    """Every calibration feed has the graphs' declared input names and shapes (T = S for step)."""
    import onnxruntime as ort

    from edgeprune.qdq import CALIBRATION_IMAGES, CALIBRATION_PROMPTS, calibration_feeds
    from edgeprune_runtime.generator import LoadedBundle

    b = bundles(None, "fp32")
    loaded = LoadedBundle(b, with_engine=False)
    scratch = {"vision": b / "vision", "prefill": b / "lm", "decode": b / "lm", "step": b / "lm"}
    # calibration_feeds reads scratch/<g>/<g>.onnx: lay the bundle's graphs out that way with links
    root = b.parent / "calib-layout"
    for g, d in scratch.items():
        (root / g).mkdir(parents=True, exist_ok=True)
        for f in d.iterdir():
            link = root / g / f.name
            if not link.exists():
                link.symlink_to(f)
    feeds = calibration_feeds(root, loaded.shapes, loaded.preprocess_params, loaded.tokenizer, loaded.prompt_template)
    n = len(CALIBRATION_IMAGES)
    assert [len(feeds[g]) for g in ("vision", "prefill", "decode", "step")] == [n, n * len(CALIBRATION_PROMPTS)] + \
        [n * len(CALIBRATION_PROMPTS)] * 2
    for g in feeds:
        session = ort.InferenceSession(str(root / g / f"{g}.onnx"))
        declared = {i.name: i.shape for i in session.get_inputs()}
        for feed in feeds[g]:
            assert set(feed) == set(declared)
            for name, value in feed.items():
                assert [d if isinstance(d, int) else value.shape[k] for k, d in enumerate(declared[name])] == list(value.shape)
    assert len({f["pixel_values"].tobytes() for f in feeds["vision"]}) == n  # three different images


@needs_rtx
@pytest.mark.tensorrt
def test_tensorrt_rtx_builds_the_qdq_bundle(bundles, tmp_path):
    """TensorRT-RTX's parser and builder (no GPU needed) build INT8 engines from the Q/DQ graphs: the Orin
    export through the builder directly, and an `rtx` export through `edgeprune build` (rtx lists int8)."""
    import tensorrt_rtx_bindings as trt

    from edgeprune.trt.build import build_engine, engine_specs
    from edgeprune.trt.targets import get_target
    from edgeprune_runtime.manifest import load_manifest

    orin = bundles("jetson-orin-jp61", "int8")
    for spec in engine_specs(load_manifest(orin)):
        assert build_engine(trt, spec, orin, tmp_path / f"{spec.name}.engine", get_target("rtx"), "int8") > 0
    rtx = bundles("rtx", "int8")
    out = cli("build", rtx, "--target", "rtx", "--json")
    assert out.returncode == 0, out.stderr
    entry = json.loads(out.stdout)
    assert entry["precision"] == "int8" and entry["library"] == "tensorrt_rtx"
