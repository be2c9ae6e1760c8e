"""TensorRT targets, `check` and `build` on the tiny twin.

Parse and build are real: TensorRT for RTX (`pip install edgeprune[trt-rtx]`) builds engines on a
CPU-only machine, so tests marked `tensorrt` run its parser and builder and skip only where it is
not installed. Executing an engine needs a GPU that TensorRT-RTX supports; those tests skip with
that reason everywhere we can test (see README "Targets").
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeprune.trt.targets import get_target, targets

from cli_helpers import EDGEPRUNE, needs_rtx


def cli(*args, env_block: str | None = None) -> subprocess.CompletedProcess:
    """The installed CLI; `env_block` names a module made unimportable (as if not installed)."""
    if env_block is None:
        return subprocess.run([str(EDGEPRUNE), *map(str, args)], capture_output=True, text=True, timeout=300)
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name.split('.')[0] == {env_block!r}:\n"
            "            raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import edgeprune.cli\n"
            f"sys.argv = ['edgeprune', *{[str(a) for a in args]!r}]\n"
            "edgeprune.cli.main()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def export_variant(tmp_path_factory, tiny, tiny_recipe):
    """(budget, **recipe flags) -> a tiny bundle exported with them (cached per module)."""
    from edgeprune.export import export_bundle
    from edgeprune.trt.forms import resolve_for_target

    root = tmp_path_factory.mktemp("trt-bundles")
    made = {}

    def make(budget=0.2, **flags):
        key = (budget, tuple(sorted(flags.items())))
        if key not in made:
            recipe = resolve_for_target(tiny_recipe(budget).override(**flags), opset_given="opset" in flags)
            name = "-".join(f"{k}{v}" for k, v in sorted(flags.items())) or "default"
            made[key] = export_bundle("llava-next-tiny", root / f"{name}-{budget}", recipe, loaded=tiny)
        return made[key]

    return make


# --- target profiles ------------------------------------------------------------------------


def test_every_target_profile_loads_with_its_facts():
    known = targets()
    assert {"p40", "jetson-xavier-jp5", "jetson-orin-jp6", "jetson-orin-jp61", "trt10", "trt11", "rtx"} <= set(known)
    assert "fp16" not in known["p40"].precisions and known["p40"].compute_capabilities == ("6.1",)
    assert known["jetson-xavier-jp5"].max_opset == 17 and known["trt11"].strongly_typed
    assert set(known["rtx"].compute_capabilities) == {"8.0", "8.6", "8.9", "12.0"}


def test_targets_json_lists_every_profile():
    out = cli("targets", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert set(data) == set(targets())
    assert data["jetson-orin-jp61"]["trt_versions"] == ["10.3"]


def test_unknown_target_lists_the_known_ones(tiny_bundles):
    out = cli("build", tiny_bundles[0.2], "--target", "jetson-orin")
    assert out.returncode == 2
    assert out.stderr.startswith("error: unknown target 'jetson-orin'") and "jetson-orin-jp61" in out.stderr
    assert "Traceback" not in out.stderr


def test_export_refuses_a_precision_the_target_cannot_run():
    out = cli("export", "llava-next-tiny", "--target", "p40", "--precision", "fp16", "--out", "/nonexistent/x")
    assert out.returncode == 2 and "FP16" in out.stderr and "p40" in out.stderr


# --- graph forms per target -----------------------------------------------------------------


def _ops(path: Path) -> set[str]:
    import onnx

    return {n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node}


def _run_vision(bundle: Path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(bundle / "vision" / "vision.onnx"), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()})


def test_xavier_export_decomposes_layernorm_with_the_same_outputs(export_variant, tiny_case, tiny_shapes):
    default, xavier = export_variant(), export_variant(target="jetson-xavier-jp5")
    assert "LayerNormalization" in _ops(default / "vision" / "vision.onnx")
    assert "LayerNormalization" not in _ops(xavier / "vision" / "vision.onnx")
    case = tiny_case((120, 200), tiny_shapes(0.2))
    for a, b in zip(_run_vision(default, case.vision_feeds), _run_vision(xavier, case.vision_feeds)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_fp16_export_halves_the_lm_weights_and_stays_close(export_variant, tiny_case, tiny_shapes):
    fp32, fp16 = export_variant(), export_variant(precision="fp16")
    w32 = (fp32 / "lm" / "lm.weights").stat().st_size
    w16 = (fp16 / "lm" / "lm.weights").stat().st_size
    assert w16 < 0.6 * w32
    case = tiny_case((120, 200), tiny_shapes(0.2))
    ref, got = _run_vision(fp32, case.vision_feeds), _run_vision(fp16, case.vision_feeds)
    np.testing.assert_array_equal(ref[1], got[1])  # selection stays fp32: the same slots are valid
    np.testing.assert_allclose(got[0], ref[0], atol=2e-2)
    assert json.loads((fp16 / "manifest.json").read_text())["onnx"]["precision"] == "fp16"


# --- check ------------------------------------------------------------------------------------


def _check(bundle, target, *more):
    out = cli("check", bundle, "--target", target, "--json", *more)
    assert out.returncode in (0, 1), out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] == (out.returncode == 0)
    return report


def _errors(report) -> list[str]:
    return [f["message"] for f in report["findings"] if f["severity"] == "error"]


def test_check_passes_a_default_bundle_on_orin_jp61(export_variant):
    report = _check(export_variant(), "jetson-orin-jp61")
    assert report["ok"], _errors(report)
    assert report["target"] == "jetson-orin-jp61"
    assert {"severity", "graph", "node", "message"} <= set(report["findings"][0])
    assert 0 < report["memory"]["total_bytes"] < report["memory"]["device_bytes"]


def test_check_refuses_opset_18_on_p40(export_variant):
    report = _check(export_variant(opset=18), "p40")
    assert not report["ok"]
    assert any("opset 18" in m and "17" in m for m in _errors(report))
    assert _check(export_variant(), "p40")["ok"]


def test_check_refuses_fp16_on_p40(export_variant):
    report = _check(export_variant(precision="fp16"), "p40")
    assert not report["ok"] and any("FP16" in m for m in _errors(report))


def test_check_xavier_needs_the_xavier_export(export_variant):
    report = _check(export_variant(), "jetson-xavier-jp5")
    assert not report["ok"] and any("LayerNormalization" in m for m in _errors(report))
    assert _check(export_variant(target="jetson-xavier-jp5"), "jetson-xavier-jp5")["ok"]


def test_check_memory_estimate_against_a_small_device(export_variant):
    report = _check(export_variant(), "rtx", "--memory-gib", "0.001")
    assert not report["ok"] and any("does not fit" in m for m in _errors(report))


def test_memory_estimate_counts_weights_once_and_the_cache(export_variant):
    from edgeprune.trt.check import check_bundle
    from edgeprune_runtime.manifest import load_manifest

    bundle = export_variant()
    m = check_bundle(bundle, get_target("jetson-orin-jp61"), use_parser=False).memory
    s = load_manifest(bundle).shapes
    assert m.weights_bytes == (bundle / "lm" / "lm.weights").stat().st_size + (bundle / "vision" / "vision.weights").stat().st_size
    # K and V, fp32, per layer [Hkv, C, Dh], counted independently of the estimator's formula
    cache = sum(np.zeros((h, s.cache_capacity, s.head_dim), np.float32).nbytes * 2 for h in s.kv_heads)
    assert m.kv_cache_bytes == cache
    assert m.activation_bytes >= s.prefill_slots * s.prefill_slots * 4  # one [S, S] attention mask at least


def test_memory_estimate_scaled_to_more_layers(export_variant, tiny):
    """--lm-layers repeats the per-layer weights and cache; expected from the torch model's own parameters."""
    from edgeprune.trt.check import check_bundle

    bundle, target = export_variant(), get_target("rtx")
    base = check_bundle(bundle, target, use_parser=False).memory
    same = check_bundle(bundle, target, use_parser=False, lm_layers=2).memory
    assert same.to_dict() == base.to_dict()
    lm = tiny.model.model.language_model
    per_layer = sum(p.numel() * 4 for p in lm.layers.parameters()) + lm.norm.weight.numel() * 4
    n = len(lm.layers)
    scaled = check_bundle(bundle, target, use_parser=False, lm_layers=3 * n).memory
    # norms under 1 KiB live inline in the graph files, not in lm.weights: within 1% of a layer
    assert scaled.weights_bytes - base.weights_bytes == pytest.approx(2 * per_layer, rel=1e-2)
    assert scaled.kv_cache_bytes == 3 * base.kv_cache_bytes


@needs_rtx
@pytest.mark.tensorrt
def test_real_parser_reports_a_refused_node(tmp_path):
    """A graph TensorRT refuses (1-D ArgMax, as the prefill graph once had) is reported node by node."""
    import onnx
    from onnx import TensorProto, helper

    from edgeprune.trt.check import _real_parser_verdict

    graph = helper.make_graph([helper.make_node("ArgMax", ["x"], ["y"], name="/last/ArgMax", axis=0, keepdims=1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [1])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "g.onnx")

    class M:
        def path(self, rel):
            return tmp_path / rel

    findings = []
    label = _real_parser_verdict({"prefill": "g.onnx"}, M(), get_target("rtx"), lambda *f: findings.append(f))
    assert label.startswith("TensorRT-RTX")
    assert findings and findings[0][0] == "error" and findings[0][2] == "/last/ArgMax" and "ArgMax" in findings[0][3]


# --- build ------------------------------------------------------------------------------------


def test_build_without_tensorrt_names_the_install_and_writes_nothing(export_variant, tmp_path):
    import shutil

    bundle = tmp_path / "b"
    shutil.copytree(export_variant(), bundle)
    before = (bundle / "manifest.json").read_bytes()
    out = cli("build", bundle, "--target", "rtx", env_block="tensorrt_rtx_bindings")
    assert out.returncode == 2 and "pip install 'edgeprune[trt-rtx]'" in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    out = cli("build", bundle, "--target", "jetson-orin-jp61", env_block="tensorrt")
    assert out.returncode == 2 and "TensorRT 10.3" in out.stderr
    assert not (bundle / "engines").exists() and (bundle / "manifest.json").read_bytes() == before
    assert sorted(p.name for p in bundle.iterdir()) == sorted(p.name for p in export_variant().iterdir())


@needs_rtx
@pytest.mark.tensorrt
def test_build_rtx_records_engines_and_the_bundle_still_runs(export_variant, tmp_path, tiny_case, tiny_shapes):
    import shutil

    from edgeprune_runtime.manifest import load_manifest, sha256_file

    bundle = tmp_path / "b"
    shutil.copytree(export_variant(), bundle)
    out = cli("build", bundle, "--target", "rtx", "--json")
    assert out.returncode == 0, out.stderr
    entry = json.loads(out.stdout)
    m = load_manifest(bundle)  # every file, engines included, matches its sha256
    assert m.data["engines"]["rtx"] == entry
    assert set(entry["engines"]) == {"vision", "lm"}
    assert entry["compute_capabilities"] == ["8.0", "8.6", "8.9", "12.0"] and entry["library"] == "tensorrt_rtx"
    for e in entry["engines"].values():
        assert m.data["files"][e["file"]] == sha256_file(bundle / e["file"]) == e["sha256"]
        assert (bundle / e["file"]).stat().st_size == e["bytes"] > 0
    lm = entry["engines"]["lm"]
    assert lm["graph"] == "lm/step.onnx" and [p["name"] for p in lm["profiles"]] == ["prefill", "decode"]
    _check_context_models(bundle, entry)
    from tiny_inputs import random_image

    random_image((60, 80), seed=1).save(tmp_path / "cam.png")
    run = cli("run", bundle, "--image", tmp_path / "cam.png", "--prompt", "hi", "--backend", "trt")
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "NvTensorRTRTXExecutionProvider" in run.stderr, run.stderr
    auto = cli("run", bundle, "--image", tmp_path / "cam.png", "--prompt", "hi", "--backend", "auto", "--json",
               "--max-new-tokens", "3")
    assert auto.returncode == 0 and json.loads(auto.stdout)["backend"] == "cpu", auto.stderr
    assert not list(bundle.glob(".engines-*")) and not list((bundle / "engines").glob(".*"))
    # building again replaces the engines, nothing else
    again = json.loads(cli("build", bundle, "--target", "rtx", "--json").stdout)
    assert load_manifest(bundle).data["engines"]["rtx"] == again


@needs_rtx
@pytest.mark.tensorrt
def test_failed_build_leaves_the_bundle_as_it_was(export_variant, tmp_path, monkeypatch):
    import shutil

    from edgeprune.errors import BuildError
    from edgeprune.trt import build as build_mod

    bundle = tmp_path / "b"
    shutil.copytree(export_variant(), bundle)
    before = {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    real = build_mod.build_engine
    calls = []

    def second_fails(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise BuildError("planted failure")
        return real(*args, **kw)

    monkeypatch.setattr(build_mod, "build_engine", second_fails)
    with pytest.raises(BuildError, match="planted"):
        build_mod.build_bundle(bundle, get_target("rtx"))
    after = {p.relative_to(bundle): p.read_bytes() for p in bundle.rglob("*") if p.is_file()}
    assert after == before and not (bundle / "engines").exists()


@needs_rtx
@pytest.mark.tensorrt
def test_decode_profile_keeps_the_weights_once(tmp_path):
    """The LM engine's decode profile (T in [1, 2]) must not store a second, GEMV-laid-out copy of
    the weights; a profile fixed at T = 1 does (the control shows the test can fail)."""
    import onnx
    import tensorrt_rtx_bindings as trt
    from onnx import TensorProto, helper, numpy_helper

    from edgeprune.trt.build import DECODE_SLOTS, EngineSpec, build_engine

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", 1024])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 1024])], [w])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "mm.onnx")
    weights = 1024 * 1024 * 4

    def size(decode):
        prefill = {"name": "prefill", "shapes": {"x": [[64, 1024]] * 3}}
        spec = EngineSpec("lm", "mm.onnx", [prefill, {"name": "decode", "shapes": {"x": [[t, 1024] for t in decode]}}])
        size = build_engine(trt, spec, tmp_path, tmp_path / "lm.engine", get_target("rtx"), "fp32")
        assert size == (tmp_path / "lm.engine").stat().st_size
        return size

    assert size(DECODE_SLOTS) < 1.2 * weights
    assert size((1, 1, 1)) > 1.8 * weights


def _build_cases():
    from edgeprune.strategies import SPECS

    for strategy, spec in SPECS.items():
        for budget in (0.1, 0.2, 1.0):
            for newlines in ("keep", "drop") if spec.newlines else ("drop",):
                yield strategy, budget, newlines


@needs_rtx
@pytest.mark.tensorrt
@pytest.mark.parametrize("strategy,budget,newlines", list(_build_cases()))
def test_every_strategy_budget_and_newline_policy_builds(tiny, tiny_recipe, tmp_path, strategy, budget, newlines):
    from edgeprune.export import export_bundle
    from edgeprune.trt.build import build_bundle

    recipe = tiny_recipe(budget).override(strategy=strategy, newlines=newlines)
    bundle = export_bundle("llava-next-tiny", tmp_path / "b", recipe, loaded=tiny)
    entry = build_bundle(bundle, get_target("rtx"))
    assert all((bundle / e["file"]).stat().st_size > 0 for e in entry["engines"].values())


@pytest.fixture(scope="module")
def sample_png(tmp_path_factory):
    from edgeprune.sample_image import write_sample_image

    return write_sample_image(tmp_path_factory.mktemp("img") / "table.png", 320, 240)


def test_compare_saves_polygraphy_json_that_polygraphy_run_reproduces(export_variant, sample_png, tmp_path):
    out = cli("compare", export_variant(), "--image", sample_png, "--save-dir", tmp_path / "cmp", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert {r["stage"] for r in report["outputs"]} == {"vision", "prefill", "decode", "step"}
    polygraphy = Path(sys.executable).with_name("polygraphy")
    for stage, graph in (("vision", "vision/vision.onnx"), ("step", "lm/step.onnx")):
        run = subprocess.run([str(polygraphy), "run", str(export_variant() / graph), "--onnxrt",
                              "--load-inputs", str(tmp_path / "cmp" / f"{stage}.inputs.json"),
                              "--load-outputs", str(tmp_path / "cmp" / f"{stage}.outputs.json"),
                              "--atol", "1e-4", "--rtol", "1e-3"], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0 and "PASSED" in run.stdout + run.stderr, run.stdout[-2000:] + run.stderr[-2000:]


def test_compare_trt_without_engines_says_how_to_build(export_variant, sample_png):
    out = cli("compare", export_variant(), "--image", sample_png, "--backends", "onnxrt,trt", "--target", "rtx")
    assert out.returncode == 2 and "edgeprune build" in out.stderr


@needs_rtx
@pytest.mark.tensorrt
def test_engines_execute_where_a_gpu_can_run_them(export_variant, sample_png, tmp_path):
    """`compare --backends onnxrt,trt` runs the engines against PyTorch where an engine can run, and says
    why it skipped them elsewhere (here: no GPU that TensorRT-RTX engines run on)."""
    import shutil

    from edgeprune.trt.build import build_bundle
    from edgeprune.trt.runner import engine_runnable

    bundle = tmp_path / "b"
    shutil.copytree(export_variant(), bundle)
    target = get_target("rtx")
    build_bundle(bundle, target)
    out = cli("compare", bundle, "--image", sample_png, "--backends", "onnxrt,trt", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    runnable, reason = engine_runnable(target)
    if not runnable:
        assert report["skipped"] == [f"rtx engines not compared: {reason}"]
        pytest.skip(reason)
    assert {"vision (trt)", "step (trt)"} <= {r["stage"] for r in report["outputs"]}


def _check_context_models(bundle, entry) -> None:
    """Each engine's EPContext wrapper: one com.microsoft::EPContext node naming the engine file beside it (embed_mode 0),
    owned by the library's provider, with exactly the inputs and outputs of the graph the engine was built from."""
    import onnx

    from edgeprune_runtime.manifest import sha256_file

    for e in entry["engines"].values():
        ctx = bundle / e["context_file"]
        assert ctx.parent == (bundle / e["file"]).parent
        model = onnx.load(str(ctx))
        onnx.checker.check_model(model)
        (node,) = model.graph.node
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert (node.op_type, node.domain) == ("EPContext", "com.microsoft")
        assert attrs == {"main_context": 1, "embed_mode": 0, "ep_cache_context": Path(e["file"]).name.encode(),
                         "source": b"NvTensorRTRTXExecutionProvider"}
        graph = onnx.load(str(bundle / e["graph"]), load_external_data=False).graph
        assert [str(v) for v in model.graph.input] == [str(v) for v in graph.input]
        assert [str(v) for v in model.graph.output] == [str(v) for v in graph.output]
        assert list(node.input) == [v.name for v in graph.input] and list(node.output) == [v.name for v in graph.output]
        assert entry["engines"] and sha256_file(ctx) == json.loads((bundle / "manifest.json").read_text())["files"][e["context_file"]]
