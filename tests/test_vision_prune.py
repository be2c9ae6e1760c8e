"""Token pruning inside the vision tower (`vision_keep` / --vision-keep) on the tiny twin.

References: transformers' own eager CLIP attention weights (which tokens survive), the unpruned graph (a
keep-all schedule must change nothing), ONNX Runtime vs torch (compare), TensorRT-RTX's parser/builder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeprune.errors import ConfigError
from edgeprune.strategies import SPECS
from edgeprune.vision_prune import NAMED, keep_counts, parse_schedule

from cli_helpers import cli, needs_rtx

HW = (200, 300)  # a 2-crop-wide image: real patches in 3 of the 5 partitions


# --- the schedule -----------------------------------------------------------------------------------


def test_parse_schedule_and_names():
    assert parse_schedule("") == ()
    assert parse_schedule(" 8:0.5, 16:0.25 ") == ((8, 0.5), (16, 0.25))
    assert parse_schedule("evit-quarter") == parse_schedule(NAMED["evit-quarter"])
    assert keep_counts("1:0.5,2:0.25", 64, 3, 5, 64) == {1: 32, 2: 16}
    assert keep_counts("", 64, 3, 5, 64) == {}


@pytest.mark.parametrize("text, words", [
    ("2:0.5,1:0.25", "not monotone: layer 1 follows layer 2"),
    ("1:0.25,2:0.5", "not monotone: layer 2 keeps 0.5"),
    ("0:0.5", "layer 0 cannot prune"),
    ("1:1.5", "must be in (0, 1]"),
    ("1=0.5", "not LAYER:FRACTION"),
])
def test_bad_schedules_are_one_clear_error(text, words):
    with pytest.raises(ConfigError, match="vision_keep") as e:
        parse_schedule(text)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_layers_past_the_tower_and_fewer_than_k_are_refused():
    with pytest.raises(ConfigError, match="names CLIP layer 3, but the exported tower has layers 0..2"):
        keep_counts("3:0.5", 64, 3, 5, 64)
    with pytest.raises(ConfigError, match="fewer than the K = 64"):
        keep_counts("1:0.1", 64, 3, 5, 64)  # 6 per partition x 5 = 30 < 64


@pytest.mark.parametrize("flag, words", [("1:0.25,2:0.5", "not monotone"), ("7:0.5", "names CLIP layer 7"),
                                         ("1:0.1", "fewer than the K")])
def test_export_refuses_a_bad_schedule_in_one_line(tmp_path, flag, words):
    out = cli("export", "llava-next-tiny", "--vision-keep", flag, "--out", tmp_path / "b")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: vision_keep") and words in lines[0]
    assert not (tmp_path / "b").exists()


# --- the graph ---------------------------------------------------------------------------------------


def _vision(tiny, tiny_recipe, budget=0.2, **flags):
    from edgeprune.graphs import VisionGraph
    from edgeprune.plan import plan_shapes

    recipe = tiny_recipe(budget).override(**flags)
    shapes = plan_shapes(tiny.config, tiny.processor.image_processor, recipe)
    return VisionGraph(tiny.model, shapes, recipe).eval(), shapes


def _run(vision, case):
    with torch.no_grad():
        return [t.numpy() for t in vision(*case.args_for(vision))]


def test_keep_everything_changes_nothing(tiny, tiny_recipe, tiny_case):
    """A schedule keeping all N tokens only reorders them: CLIP after the position embeddings is permutation-
    equivariant, so embeddings, validity and sources equal the unpruned graph's."""
    plain, shapes = _vision(tiny, tiny_recipe)
    pruned, _ = _vision(tiny, tiny_recipe, vision_keep="1:1.0,2:1.0")
    case = tiny_case(HW, shapes)
    ref, got = _run(plain, case), _run(pruned, case)
    np.testing.assert_array_equal(got[1], ref[1])
    np.testing.assert_array_equal(got[2], ref[2])
    np.testing.assert_allclose(got[0], ref[0], atol=1e-5)


def _survivors_by_transformers(tiny, case, keep: int) -> np.ndarray:
    """[P, keep] patch indices (0-based, CLS excluded) with the highest CLS-row attention summed over heads at
    CLIP layer 1's input, from transformers' eager attention weights; padding patches never survive."""
    tower = tiny.model.model.vision_tower
    layer = tower.encoder.layers[1]
    with torch.no_grad():
        h = tower.pre_layrnorm(tower.embeddings(case.pixel_values))
        h = tower.encoder.layers[0](h, None)
        h = h[0] if isinstance(h, tuple) else h
        impl = layer.self_attn.config._attn_implementation
        layer.self_attn.config._attn_implementation = "eager"
        try:
            _, weights = layer.self_attn(hidden_states=layer.layer_norm1(h))  # [P, H, 1+N, 1+N]
        finally:
            layer.self_attn.config._attn_implementation = impl
    cls_row = weights[:, :, 0, 1:].sum(dim=1).numpy()  # [P, N]
    valid = case.vision_feeds["patch_valid"]
    cls_row = np.where(valid > 0, cls_row, -1.0)
    return np.argsort(-cls_row, axis=1, kind="stable")[:, :keep]


@pytest.mark.parametrize("strategy", sorted(SPECS))
def test_every_strategy_selects_among_survivors_with_k_exact(tiny, tiny_recipe, tiny_case, strategy):
    """One cut at layer 1 keeping 16 of 64 tokens per partition: the selected sources are real survivors
    (independently: transformers' eager attention), and K is exact while real survivors suffice."""
    if strategy == "hired-reference":
        pytest.skip("hired-reference reproduces the released code, which may emit fewer than K")
    pruned, shapes = _vision(tiny, tiny_recipe, strategy=strategy, vision_keep="1:0.25")
    case = tiny_case(HW, shapes)
    embeds, valid, source = _run(pruned, case)
    keep = 16
    survivors = _survivors_by_transformers(tiny, case, keep)  # [P, 16]
    n = shapes.patches_per_partition
    real = case.vision_feeds["patch_valid"]
    real_survivors = {p * n + i for p in range(shapes.partitions) for i in survivors[p] if real[p, i] > 0}
    chosen = {int(s) for s, v in zip(source, valid) if v > 0 and s < shapes.partitions * n}
    assert chosen <= real_survivors, sorted(chosen - real_survivors)[:5]
    assert int(valid[: shapes.visual_topk].sum()) == min(shapes.visual_topk, len(real_survivors))
    assert len(real_survivors) >= shapes.visual_topk  # this image: K exact
    assert int(valid.sum()) >= shapes.visual_topk


@pytest.fixture(scope="module")
def pruned_bundle(tmp_path_factory, tiny, tiny_recipe):
    from edgeprune.export import export_bundle

    out = tmp_path_factory.mktemp("vision-prune") / "b"
    return export_bundle("llava-next-tiny", out, tiny_recipe(0.2).override(vision_keep="1:0.5,2:0.25"), loaded=tiny)


def test_bundle_records_the_schedule_and_onnx_matches_torch(pruned_bundle, tmp_path):
    from edgeprune.compare import compare_bundle
    from edgeprune.sample_image import write_sample_image

    manifest = json.loads((pruned_bundle / "manifest.json").read_text())
    assert manifest["vision_keep"] == {"1": 32, "2": 16} and manifest["recipe"]["vision_keep"] == "1:0.5,2:0.25"
    report = compare_bundle(pruned_bundle, str(write_sample_image(tmp_path / "s.png", 320, 240)))
    assert report, [r for r in report.rows if not r.passed]


def test_default_export_has_no_pruning(tmp_path, tiny, tiny_recipe):
    """Off = today's graph: the vision graph's TopK count (selection's two) and no manifest record."""
    import onnx

    from edgeprune.export import export_bundle

    b = export_bundle("llava-next-tiny", tmp_path / "b", tiny_recipe(0.2), loaded=tiny)
    ops = [n.op_type for n in onnx.load(str(b / "vision" / "vision.onnx"), load_external_data=False).graph.node]
    assert "GatherElements" not in ops
    assert "vision_keep" not in json.loads((b / "manifest.json").read_text())


@pytest.mark.tensorrt
@needs_rtx
@pytest.mark.parametrize("precision", ["fp32", "fp16"])  # the precisions the rtx target allows
def test_pruned_bundle_checks_and_builds_for_rtx(tmp_path, tiny, tiny_recipe, precision):
    from edgeprune.export import export_bundle
    from edgeprune.trt.forms import resolve_for_target

    recipe = resolve_for_target(tiny_recipe(0.2).override(vision_keep="1:0.5,2:0.25", precision=precision,
                                                           target="rtx"), opset_given=False)
    bundle = export_bundle("llava-next-tiny", tmp_path / "b", recipe, loaded=tiny)
    out = cli("check", bundle, "--target", "rtx")
    assert out.returncode == 0, out.stdout + out.stderr
    out = cli("build", bundle, "--target", "rtx")
    assert out.returncode == 0, out.stdout + out.stderr
    built = json.loads((bundle / "manifest.json").read_text())["engines"]["rtx"]["engines"]
    assert set(built) == {"vision", "lm"} and all(e["bytes"] > 0 for e in built.values())
