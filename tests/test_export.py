"""`export_bundle` on the tiny twin: the bundle contract, ONNX Runtime vs the eager graphs, atomicity, recipe errors."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.common import TensorMetadata
from polygraphy.comparator import Comparator, SimpleCompareFunc

from edgeprune.errors import ConfigError, ExportError
from edgeprune.export import export_bundle
from edgeprune.graphs import DecodeGraph, PrefillGraph, VisionGraph
from edgeprune.recipe import load_recipe, recipe_from_dict
from edgeprune_runtime.errors import RuntimeStatusError
from edgeprune_runtime.manifest import load_manifest

GRAPHS = ("vision/vision.onnx", "lm/prefill.onnx", "lm/decode.onnx")
ATOL = 1e-5


@pytest.fixture(scope="module", params=[0.2, 1.0], ids=["budget0.2", "budget1.0"])
def bundle(request, tiny_bundles):
    return tiny_bundles[request.param]


def _initializers(model):
    return {t.name: t for t in model.graph.initializer}


def _external(model) -> dict[str, dict]:
    """name -> external_data entries (location/offset/length) of every externally stored initializer."""
    return {t.name: {e.key: e.value for e in t.external_data}
            for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}


def _listing(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


# --- the bundle contract ----------------------------------------------------------------------------


@pytest.mark.parametrize("rel", GRAPHS)
def test_graphs_pass_onnx_checker_with_opset_17(bundle, rel):
    onnx.checker.check_model(str(bundle / rel))  # path form: external data and all
    model = onnx.load(str(bundle / rel), load_external_data=False)
    assert {o.domain: o.version for o in model.opset_import}.get("", None) == 17


def _io_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    model = onnx.load(str(path), load_external_data=False)
    shapes = {}
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        assert all(d.HasField("dim_value") and d.dim_value > 0 for d in dims), f"{path.name}: {value.name} {dims}"
        shapes[value.name] = tuple(d.dim_value for d in dims)
    return shapes


def test_graph_interfaces_are_static_and_match_shapes(bundle):
    """Every input/output dim is a fixed int, and the names and sizes are the manifest's documented ones."""
    s = load_manifest(bundle).shapes
    n = s.patches_per_partition
    vision = {"pixel_values": (s.partitions, 3, s.crop_size, s.crop_size), "patch_valid": (s.partitions, n),
              "patch_key": (s.partitions, n), "base_region": (n,),  # base_region: the default strategy, hired
              "visual_embeds": (s.visual_slots, s.hidden_size), "visual_valid": (s.visual_slots,),
              "visual_source": (s.visual_slots,)}
    if s.newline_slots:  # without newlines the exporter drops their inputs
        vision |= {"newline_key": (s.newline_slots,), "newline_valid": (s.newline_slots,)}
    got_vision = _io_shapes(bundle / "vision/vision.onnx")
    # patch_row places newlines after rows with kept tokens; keep-all (budget 1.0) needs no placement
    assert got_vision.pop("patch_row", (s.partitions, n)) == (s.partitions, n)
    assert ("patch_row" in _io_shapes(bundle / "vision/vision.onnx")) == (0 < s.newline_slots and s.visual_topk < s.partitions * n)
    t = s.text_slots_before_image + s.text_slots_after_image
    prefill = {"text_ids": (t,), "text_valid": (t,), "visual_embeds": (s.visual_slots, s.hidden_size),
               "visual_valid": (s.visual_slots,), "logits": (s.vocab_size,)}
    decode = {"token_id": (1,), "position": (1,), "cache_valid": (s.cache_capacity,), "logits": (s.vocab_size,)}
    for layer, heads in enumerate(s.kv_heads):
        for kind in ("key", "value"):
            prefill[f"{kind}_{layer}"] = (heads, s.prefill_slots, s.head_dim)
            decode[f"past_{kind}_{layer}"] = (heads, s.cache_capacity, s.head_dim)
            decode[f"new_{kind}_{layer}"] = (heads, 1, s.head_dim)
    assert got_vision == vision
    assert _io_shapes(bundle / "lm/prefill.onnx") == prefill
    assert _io_shapes(bundle / "lm/decode.onnx") == decode


def test_manifest_hashes_cover_every_file(bundle, tmp_path):
    manifest = load_manifest(bundle, verify_hashes=True)
    on_disk = {rel for rel in _listing(bundle) if rel != "manifest.json"}
    assert set(manifest.data["files"]) == on_disk
    assert manifest.data["onnx"]["opset"] == 17

    corrupt = shutil.copytree(bundle, tmp_path / "corrupt")
    with open(corrupt / "lm/lm.weights", "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(RuntimeStatusError, match="lm/lm.weights"):
        load_manifest(corrupt, verify_hashes=True)


def test_language_model_weights_stored_once(bundle, tiny):
    prefill = onnx.load(str(bundle / "lm/prefill.onnx"), load_external_data=False)
    decode = onnx.load(str(bundle / "lm/decode.onnx"), load_external_data=False)
    ext_p, ext_d = _external(prefill), _external(decode)
    assert ext_p and ext_d
    assert {e["location"] for e in [*ext_p.values(), *ext_d.values()]} == {"lm.weights"}

    weights = (bundle / "lm/lm.weights").stat().st_size
    lm_bytes = sum(p.numel() * p.element_size() for m in (tiny.model.model.language_model, tiny.model.lm_head)
                   for p in m.parameters())
    assert 0.95 * lm_bytes <= weights <= 1.05 * lm_bytes, (weights, lm_bytes)
    # Both graphs read the same bytes: nearly all of lm.weights is referenced by prefill AND decode.
    spans = lambda ext: {(int(e["offset"]), int(e["length"])) for e in ext.values()}  # noqa: E731
    shared = sum(length for _, length in spans(ext_p) & spans(ext_d))
    assert shared >= 0.95 * lm_bytes

    vision_bytes = sum(p.numel() * p.element_size() for m in (tiny.model.model.vision_tower,
                                                              tiny.model.model.multi_modal_projector)
                       for p in m.parameters())
    assert (bundle / "vision/vision.weights").stat().st_size < vision_bytes  # the last CLIP layer is dropped
    total = sum((bundle / rel).stat().st_size for rel in _listing(bundle))
    assert total <= 1.3 * tiny.weights_bytes, (total, tiny.weights_bytes)


# --- ONNX Runtime vs the eager torch graphs ---------------------------------------------------------


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def modules(tiny):
    """bundle -> (shapes, VisionGraph, PrefillGraph, DecodeGraph) built like the export did."""
    def make(bundle):
        m = load_manifest(bundle, verify_hashes=False)
        s, recipe = m.shapes, recipe_from_dict(m.data["recipe"])
        return (s, VisionGraph(tiny.model, s, recipe).eval(),
                PrefillGraph(tiny.model, s).eval(), DecodeGraph(tiny.model, s).eval())
    return make


@pytest.mark.parametrize("hw", [(100, 100), (300, 90), (224, 224)])
def test_vision_onnx_equals_torch(bundle, modules, tiny_case, hw):
    s, vision, _, _ = modules(bundle)
    case = tiny_case(hw, s)
    session = _session(bundle / "vision/vision.onnx")
    names = [i.name for i in session.get_inputs()]
    assert set(names) <= set(case.vision_feeds)
    got = session.run(None, {n: case.vision_feeds[n] for n in names})
    with torch.no_grad():
        want = [t.numpy() for t in vision(*case.args_for(vision))]
    np.testing.assert_array_equal(got[1], want[1])  # visual_valid
    np.testing.assert_array_equal(got[2], want[2])  # visual_source (-1 on padding slots)
    valid = want[1] > 0
    assert valid.sum() > 0
    np.testing.assert_allclose(got[0][valid], want[0][valid], atol=ATOL, rtol=0)  # padding slots are don't-care


class TorchRunner(BaseRunner):
    """A Polygraphy runner for an eager torch graph module (PytRunner is unusable on CPU)."""

    def __init__(self, module, feed: dict[str, np.ndarray], output_names: list[str]):
        super().__init__(name="torch")
        self.module, self.input_names, self.output_names = module, list(feed), output_names
        self.metadata = TensorMetadata()
        for name, array in feed.items():
            self.metadata.add(name, array.dtype, array.shape)

    def get_input_metadata_impl(self):
        return self.metadata

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        with torch.no_grad():
            outs = self.module(*[torch.from_numpy(feed_dict[n]) for n in self.input_names])
        self.inference_time = time.perf_counter() - start
        return OrderedDict((n, np.ascontiguousarray(o.numpy())) for n, o in zip(self.output_names, outs))


def _compare(module, path: Path, feed: dict[str, np.ndarray]):
    """Polygraphy: torch module vs ONNX Runtime on one feed; returns (passed, ORT outputs)."""
    session = _session(path)
    output_names = [o.name for o in session.get_outputs()]
    runners = [TorchRunner(module, feed, output_names), OnnxrtRunner(SessionFromOnnx(str(path)), name="onnxrt")]
    results = Comparator.run(runners, data_loader=[feed])
    passed = Comparator.compare_accuracy(results, compare_func=SimpleCompareFunc(atol=ATOL, rtol=0.0))
    ort_outputs = results["onnxrt"][0]
    return bool(passed), {name: ort_outputs[name] for name in output_names}


@pytest.mark.parametrize("hw", [(100, 100), (224, 224)])
def test_prefill_and_decode_onnx_equal_torch(bundle, modules, tiny_case, hw):
    s, vision, prefill, decode = modules(bundle)
    case = tiny_case(hw, s)
    with torch.no_grad():
        embeds, valid, _ = vision(*case.args_for(vision))
    feed = {"text_ids": case.text_ids.numpy(), "text_valid": case.text_valid.numpy(),
            "visual_embeds": embeds.numpy(), "visual_valid": valid.numpy()}
    passed, out = _compare(prefill, bundle / "lm/prefill.onnx", feed)
    assert passed, "prefill: ONNX Runtime differs from torch"

    t1 = s.text_slots_before_image
    seq_valid = np.concatenate([feed["text_valid"][:t1], feed["visual_valid"], feed["text_valid"][t1:]]) > 0
    n = int(seq_valid.sum())
    rng = np.random.default_rng(0)
    feed = {"token_id": np.array([int(out["logits"].argmax())]), "position": np.array([n]),
            "cache_valid": (np.arange(s.cache_capacity) < n).astype(np.float32)}
    for layer in range(s.num_layers):
        for kind in ("key", "value"):
            present = out[f"{kind}_{layer}"]
            past = rng.standard_normal((present.shape[0], s.cache_capacity, s.head_dim)).astype(np.float32)
            past[:, :n] = present[:, seq_valid]
            feed[f"past_{kind}_{layer}"] = past
    passed, _ = _compare(decode, bundle / "lm/decode.onnx", feed)
    assert passed, "decode: ONNX Runtime differs from torch"


# --- atomic output directory ------------------------------------------------------------------------


def test_refuses_non_bundle_directory_and_leaves_it_untouched(tiny, tiny_recipe, tmp_path):
    out = tmp_path / "photos"
    (out / "sub").mkdir(parents=True)
    (out / "cat.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (out / "sub" / "notes.txt").write_text("keep me")
    before = _listing(out)
    with pytest.raises(ExportError, match="not an edgeprune bundle"):
        export_bundle("llava-next-tiny", out, tiny_recipe(0.2), loaded=tiny)
    assert _listing(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_exports_into_an_existing_empty_directory(tiny, tiny_recipe, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    export_bundle("llava-next-tiny", out, tiny_recipe(0.2), loaded=tiny)
    assert load_manifest(out).data["recipe"]["budget"] == 0.2
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()],
                         ids=["RuntimeError", "KeyboardInterrupt"])
@pytest.mark.parametrize("with_old_bundle", [False, True], ids=["fresh", "over-old-bundle"])
def test_failure_midway_leaves_nothing_behind(tiny, tiny_recipe, tmp_path, monkeypatch, error, with_old_bundle):
    out = tmp_path / "bundle"
    if with_old_bundle:
        export_bundle("llava-next-tiny", out, tiny_recipe(0.2), loaded=tiny)
        old = _listing(out)
    scratch_root = tmp_path / "tmp"
    scratch_root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch_root))  # where the trace scratch dir goes

    calls = []

    def failing_check(path, **kwargs):
        calls.append(path)
        raise error

    monkeypatch.setattr("edgeprune.onnx_export.check_static", failing_check)
    with pytest.raises(type(error)):
        export_bundle("llava-next-tiny", out, tiny_recipe(1.0), loaded=tiny)
    assert calls, "the failure was not injected at the check stage"
    assert _leftovers(tmp_path) == []
    assert list(scratch_root.iterdir()) == [], "the trace scratch directory was left behind"
    if with_old_bundle:
        assert _listing(out) == old, "the old bundle was modified"
        load_manifest(out, verify_hashes=True)
    else:
        assert not out.exists()


def test_reexport_replaces_an_existing_bundle(tiny, tiny_recipe, tmp_path):
    out = tmp_path / "bundle"
    export_bundle("llava-next-tiny", out, tiny_recipe(0.2), loaded=tiny)
    first = load_manifest(out).shapes
    export_bundle("llava-next-tiny", out, tiny_recipe(1.0), loaded=tiny)
    manifest = load_manifest(out, verify_hashes=True)
    assert manifest.data["recipe"]["budget"] == 1.0
    assert manifest.shapes.visual_topk == 320 != first.visual_topk
    assert _leftovers(tmp_path) == []  # a file the old manifest does not list blocks the replacement: test_trust_export


def test_budget_that_keeps_no_token_fails_before_writing(tiny, tiny_recipe, tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(ConfigError, match="keeps no visual token"):
        export_bundle("llava-next-tiny", out, tiny_recipe(0.0001), loaded=tiny)
    assert list(tmp_path.iterdir()) == []


def test_unknown_model_name_suggests_nearest(tmp_path):
    with pytest.raises(ConfigError, match="Did you mean 'llava-next-tiny'"):
        export_bundle("llava-next-tiyn", tmp_path / "b", load_recipe(None))
    assert list(tmp_path.iterdir()) == []


# --- recipe errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0, 0.0, 1.5, -0.2])
def test_recipe_budget_out_of_range(tiny_recipe, tmp_path, budget):
    with pytest.raises(ConfigError, match=r"budget must be in \(0, 1\]"):
        tiny_recipe(budget)
    path = tmp_path / "r.toml"
    path.write_text(f"budget = {budget}\n")
    with pytest.raises(ConfigError, match=r"budget must be in \(0, 1\]"):
        load_recipe(path)


@pytest.mark.parametrize("text, message", [
    ("budgt = 0.3\n", r"unknown recipe key 'budgt'\. Did you mean 'budget'\?"),
    ("[shapes]\ntext_slots_befor_image = 8\n",
     r"unknown recipe key 'shapes\.text_slots_befor_image'\. Did you mean 'text_slots_before_image'\?"),
    ("[onnx]\nopsett = 17\n", r"unknown recipe key 'onnx\.opsett'\. Did you mean 'opset'\?"),
    ("strategy = 'global_topk'\n", r"strategy 'global_topk' is not one of .*\. Did you mean 'global-topk'\?"),
    ("newlines = 'kep'\n", r"Did you mean 'keep'\?"),
    ("budget = 0.2\nbudget = 0.3\n", "not valid TOML"),
    ("[shapes\nnew_token_slots = 3\n", "not valid TOML"),
    ("budget = \n", "not valid TOML"),
    ("shapes = 3\n", r"'shapes' must be a table"),
    ("[strategy]\nname = 'x'\n", "recipe key 'strategy' must be a string"),
    ("[onnx]\nopset = 9\n", "onnx.opset must be between 13 and 21"),
    ("[shapes]\nnew_token_slots = 0\n", r"shapes\.new_token_slots must be >= 1"),
])
def test_recipe_file_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_recipe(path)


def test_unknown_strategy_flag_suggests_nearest(tiny_recipe):
    with pytest.raises(ConfigError, match=r"Did you mean 'global-topk'\?"):
        tiny_recipe(0.2).override(strategy="globaltopk")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")


def test_recipe_file_values_and_flag_precedence():
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "edgeprune" / "recipes" / "llava-next-tiny.toml")
    assert (recipe.budget, recipe.shapes.text_slots_before_image, recipe.shapes.new_token_slots) == (0.2, 16, 64)
    assert recipe.override(budget=0.5, strategy=None).budget == 0.5
    assert recipe.override(budget=None).budget == 0.2
    assert not recipe.keeps_newlines() and recipe.override(budget=1.0).keeps_newlines()


def test_store_weights_once_handles_externalised_constants(tiny_bundles, tmp_path):
    """Above 2 GB the TorchScript exporter writes Constant attributes as external data too (seen on the
    7B-shaped model at budget 0.4); the weights pass must bring them back into the graph."""
    from onnx import external_data_helper

    from edgeprune.onnx_export import store_weights_once

    src = Path(tiny_bundles[0.2]) / "lm" / "prefill.onnx"
    model = onnx.load(str(src))
    external_data_helper.convert_model_to_external_data(model, all_tensors_to_one_file=False, size_threshold=0,
                                                        convert_attribute=True)
    (tmp_path / "scratch").mkdir()
    onnx.save_model(model, str(tmp_path / "scratch" / "prefill.onnx"))
    scratch = onnx.load(str(tmp_path / "scratch" / "prefill.onnx"), load_external_data=False)
    assert any(a.type == onnx.AttributeProto.TENSOR and external_data_helper.uses_external_data(a.t)
               for n in scratch.graph.node for a in n.attribute)
    store_weights_once({tmp_path / "scratch" / "prefill.onnx": tmp_path / "out" / "prefill.onnx"},
                       tmp_path / "out" / "lm.weights")
    onnx.checker.check_model(str(tmp_path / "out" / "prefill.onnx"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["lm.weights", "lm.weights.json", "prefill.onnx"]
    feeds = {i.name: np.zeros(i.shape, np.int64 if "int64" in i.type else np.float32)
             for i in _session(src).get_inputs()}
    feeds["text_valid"][0] = 1.0
    np.testing.assert_array_equal(_session(src).run(None, feeds)[0],
                                  _session(tmp_path / "out" / "prefill.onnx").run(None, feeds)[0])
