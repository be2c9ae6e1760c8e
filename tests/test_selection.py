"""Token-selection strategies (issue: HiRED exactly, the other training-free rules).

- hired-reference keeps, token for token and in order, what the released HiRED code keeps
  (checked against tests/hired_reference_impl.py, an independent plain-torch oracle);
- every other strategy fills exactly min(K, real patches) slots, never with padding, sorted into
  sequence order, for every budget on square, wide and tall images;
- the ONNX vision graph equals the eager module for every strategy (Polygraphy: `edgeprune compare`, in
  tests/test_cli_run.py::test_compare_passes_for_every_strategy).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeprune.errors import ConfigError
from edgeprune.graphs import VisionGraph
from edgeprune.plan import plan_shapes
from edgeprune.selection import largest_remainder, rank_within
from hired_reference_impl import hired_reference_keep

STRATEGIES = ["hired", "visionzip", "global-topk", "uniform", "random"]
BUDGETS = [0.05, 0.1, 0.2, 0.4, 1.0]
IMAGES = {"square": (100, 100), "wide": (60, 200), "tall": (300, 90), "grid2x2": (224, 224)}


@pytest.fixture(scope="module")
def vision_for(tiny, tiny_recipe):
    made = {}

    def get(strategy: str, budget: float, **flags):
        key = (strategy, budget, tuple(sorted(flags.items())))
        if key not in made:
            recipe = tiny_recipe(budget).override(strategy=strategy, **flags)
            shapes = plan_shapes(tiny.config, tiny.processor.image_processor, recipe)
            made[key] = (shapes, VisionGraph(tiny.model, shapes, recipe).eval())
        return made[key]

    return get


def run_vision(vision, case_layout, pixel_values):
    feeds = {"pixel_values": pixel_values, **{k: torch.from_numpy(v) for k, v in case_layout.feeds().items()}}
    with torch.no_grad():
        embeds, valid, source = vision(*[feeds[n] for n in vision.input_names])
    return embeds, valid, source


def coords(source: torch.Tensor, valid: torch.Tensor, shapes):
    n, g = shapes.patches_per_partition, shapes.patch_grid
    src = source[valid > 0]
    src = src[src < shapes.partitions * n]  # newline slots carry sources past the patch range
    return [(int(s) // n, (int(s) % n) // g, int(s) % g) for s in src]


@pytest.mark.parametrize("alpha", [0.5, 0.3])
@pytest.mark.parametrize("budget", [0.1, 0.2, 0.4])
@pytest.mark.parametrize("hw", [(224, 224), (100, 100), (60, 200), (300, 90), (180, 150)])
def test_hired_reference_matches_released_code(tiny, vision_for, tiny_case, hw, budget, alpha):
    shapes, vision = vision_for("hired-reference", budget, alpha=alpha)
    case = tiny_case(hw, shapes)
    _, valid, source = run_vision(vision, case.layout, case.pixel_values)
    p_act = 1 + case.layout.grid[0] * case.layout.grid[1]
    real_pixels = case.hf_inputs["pixel_values"][0][:p_act]
    expected = hired_reference_keep(tiny.model.model.vision_tower, real_pixels, hw, tiny.config, budget, alpha)
    assert coords(source, valid, shapes) == expected  # same set, same order
    assert int(valid.sum()) <= shapes.visual_topk


@pytest.mark.parametrize("budget,alpha", [
    (1.0, 0.5), (1.0, 0.1),  # the crops' share reaches their capacity ((P-1) x N caps it)
    (0.4, 0.98),  # the base image's top int(N (1 - alpha)) is one token: one crop band gets every count
    (0.00625, 0.98),  # total 2 on a 2x2 grid: one base slot, one crop slot
])
@pytest.mark.parametrize("hw", [(224, 224), (60, 200)])
def test_hired_reference_matches_released_code_at_the_edges(tiny, vision_for, tiny_case, hw, budget, alpha):
    test_hired_reference_matches_released_code(tiny, vision_for, tiny_case, hw, budget, alpha)


def test_hired_reference_on_2x2_grid_fills_the_budget(vision_for, tiny_case):
    shapes, vision = vision_for("hired-reference", 0.2)
    case = tiny_case((224, 224), shapes)
    _, valid, _ = run_vision(vision, case.layout, case.pixel_values)
    assert case.layout.grid == (2, 2)
    assert int(valid.sum()) == int(5 * 64 * 0.2)  # a square grid loses nothing to the packing quirk


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("image", sorted(IMAGES))
def test_exactly_k_real_slots_in_order(vision_for, tiny_case, strategy, budget, image):
    shapes, vision = vision_for(strategy, budget)
    case = tiny_case(IMAGES[image], shapes)
    _, valid, source = run_vision(vision, case.layout, case.pixel_values)
    n_patches = shapes.partitions * shapes.patches_per_partition
    src = source[valid > 0]
    patch_src = src[src < n_patches]
    expected = min(shapes.visual_topk, case.layout.num_patches)
    assert len(patch_src) == expected
    assert len(set(patch_src.tolist())) == expected, "a patch fills two slots"
    assert case.layout.patch_valid.reshape(-1)[patch_src.numpy()].all(), "a padding patch was selected"
    keys = case.layout.patch_key.reshape(-1)[patch_src.numpy()]
    assert np.all(np.diff(keys) > 0), "slots are not in sequence (raster) order"
    assert torch.all(valid[: len(src)] == 1) and torch.all(valid[len(src):] == 0), "valid slots come first"


def test_hired_allocates_crops_by_their_spatial_region(vision_for, tiny_case):
    """With alpha = 0.5 on a 2x2 grid the base keeps round(K/2); each crop's share follows how many of the
    base image's top layer-0 tokens lie in the quarter of the base image that crop covers."""
    shapes, vision = vision_for("hired", 0.2)
    case = tiny_case((224, 224), shapes)
    _, valid, source = run_vision(vision, case.layout, case.pixel_values)
    per_partition = np.bincount([p for p, _, _ in coords(source, valid, shapes)], minlength=5)
    assert per_partition[0] == round(shapes.visual_topk * 0.5)
    assert per_partition.sum() == shapes.visual_topk
    region = case.layout.base_region.reshape(8, 8)
    assert set(region[:4, :4].flatten()) == {1} and set(region[4:, 4:].flatten()) == {4}


@pytest.mark.parametrize("budget, alpha", [(0.2, 0.5), (0.13, 0.5), (0.13, 0.3)])
@pytest.mark.parametrize("hw", [(224, 224), (180, 150), (100, 220), (300, 90)])
def test_hired_keeps_what_transformers_attention_decides(tiny, vision_for, tiny_case, hw, budget, alpha):
    """The kept set of `hired` on the tiny twin, against the rule applied to CLS attention computed by the oracle of
    tests/hired_reference_impl.py from transformers' CLIP layers (layer 0 for the crops' shares, the feature layer
    within each partition). Budget 0.13 (K = 42) leaves remainders; the images give 2x2, 1x2 and 2x1 grids with
    padding, where the base image's top layer-0 tokens fall unevenly across the crops' regions."""
    from fractions import Fraction

    from hired_reference_impl import _cls_attention
    from test_selection_rules import chosen_by_rule, hired_budgets

    shapes, vision = vision_for("hired", budget, alpha=alpha)
    case = tiny_case(hw, shapes)
    _, valid, source = run_vision(vision, case.layout, case.pixel_values)
    n, g, p = shapes.patches_per_partition, shapes.patch_grid, shapes.partitions
    real = case.hf_inputs["pixel_values"][0][: 1 + case.layout.grid[0] * case.layout.grid[1]]
    tower = tiny.model.model.vision_tower
    feat = len(tower.encoder.layers) + tiny.config.vision_feature_layer
    rows = _cls_attention(tower, real, [0, feat])
    early = rows[0][:, :, 1:].sum(dim=1)  # [p_real, N] CLS -> patch attention summed over heads
    scores = torch.zeros(p, n)
    scores[: len(real)] = rows[feat][:, :, 1:].sum(dim=1)
    budgets = hired_budgets(early[0].tolist(), case.layout.base_region.astype(int).tolist(), shapes.visual_topk,
                            Fraction(str(alpha)), n, p - 1)
    expected = chosen_by_rule(budgets, scores.tolist(), case.layout.patch_valid.tolist())
    got = [set() for _ in range(p)]
    for q, r, c in coords(source, valid, shapes):
        got[q].add(r * g + c)
    # slots the rule leaves empty (a crop with fewer real patches than its share) go to the best other real patches
    spare = shapes.visual_topk - sum(len(e) for e in expected)
    assert all(e <= k for e, k in zip(expected, got)) and sum(len(k) for k in got) - sum(map(len, expected)) == spare
    assert len(set(budgets[1:])) > 1, "the layout should split the crops' share unevenly"


def test_hired_alpha_extremes(vision_for, tiny_case):
    for alpha, base in [(1.0, 64), (0.0, 0)]:
        shapes, vision = vision_for("hired", 0.2, alpha=alpha)
        case = tiny_case((224, 224), shapes)
        _, valid, source = run_vision(vision, case.layout, case.pixel_values)
        parts = [p for p, _, _ in coords(source, valid, shapes)]
        assert parts.count(0) == base and len(parts) == shapes.visual_topk


def test_hired_full_budget_reproduces_transformers_features(tiny, vision_for, tiny_case):
    shapes, vision = vision_for("hired", 1.0)
    case = tiny_case((60, 200), shapes)
    embeds, valid, _ = run_vision(vision, case.layout, case.pixel_values)
    with torch.no_grad():
        ref = tiny.model.model.get_image_features(case.hf_inputs["pixel_values"],
                                                  case.hf_inputs["image_sizes"]).pooler_output[0]
    n = int(valid.sum())
    assert n == ref.shape[0]
    torch.testing.assert_close(embeds[:n], ref, atol=1e-5, rtol=0)


def test_uniform_spreads_evenly(vision_for, tiny_case):
    shapes, vision = vision_for("uniform", 0.25)
    case = tiny_case((224, 224), shapes)  # 2x2 grid: every partition fully real, 16 of 64 each
    _, valid, source = run_vision(vision, case.layout, case.pixel_values)
    kept = coords(source, valid, shapes)
    for p in range(5):
        mine = [(r, c) for q, r, c in kept if q == p]
        flat = sorted(r * 8 + c for r, c in mine)
        assert len(flat) == 16
        nearest = min(max(abs(a - c), abs(b - d)) for i, (a, b) in enumerate(mine) for c, d in mine[i + 1:])
        assert nearest >= 2, mine  # no two picks touch: 16 of 64 on a 2-patch lattice
        quadrants = np.bincount([2 * (r // 4) + c // 4 for r, c in mine], minlength=4)
        assert quadrants.tolist() == [4, 4, 4, 4], mine  # an even stride along the Z-curve: 4 per quadrant


def test_random_is_seeded(vision_for, tiny_case):
    picks = []
    for seed in (0, 0, 1):
        shapes, vision = vision_for("random", 0.2, seed=seed)
        case = tiny_case((224, 224), shapes)
        _, valid, source = run_vision(vision, case.layout, case.pixel_values)
        picks.append(coords(source, valid, shapes))
    assert picks[0] == picks[1] and picks[0] != picks[2]


def test_visionzip_merges_contextual_tokens(tiny, vision_for, tiny_case):
    """Dominant slots carry their own projected feature; contextual slots carry a merged one."""
    shapes, vision = vision_for("visionzip", 0.2, contextual=0.25)
    case = tiny_case((224, 224), shapes)
    embeds, valid, source = run_vision(vision, case.layout, case.pixel_values)
    with torch.no_grad():
        hidden = tiny.model.model.vision_tower(case.pixel_values, output_hidden_states=True).hidden_states[-2][:, 1:]
        own = tiny.model.model.multi_modal_projector(hidden.reshape(-1, hidden.shape[-1]))
    n = int(valid.sum())
    same = torch.isclose(embeds[:n], own[source[:n]], atol=1e-5).all(dim=1)
    merged = int((~same).sum())
    # per partition: round(share * 0.25) contextual of 13 slots (64 over 5 partitions) -> 3 each, some may be lonely
    assert 0 < merged <= 5 * 4
    assert n == shapes.visual_topk


def test_rank_and_largest_remainder():
    scores = torch.tensor([[0.3, 0.9, 0.3, 0.1]])
    assert rank_within(scores, torch.ones_like(scores)).tolist() == [[1.0, 0.0, 2.0, 3.0]]
    assert rank_within(scores, torch.tensor([[1.0, 0.0, 1.0, 1.0]])).tolist() == [[0.0, 0.0, 1.0, 2.0]]
    shares = largest_remainder(torch.tensor([1.0, 1.0, 1.0]), 10.0)
    assert shares.tolist() == [4.0, 3.0, 3.0]
    assert largest_remainder(torch.tensor([5.0, 3.0, 0.0]), 7.0).tolist() == [4.0, 3.0, 0.0]


@pytest.mark.parametrize("flags, message", [
    ({"strategy": "hird"}, r"Did you mean 'hired'"),
    ({"strategy": "visonzip"}, r"Did you mean 'visionzip'"),
    ({"alpha": 1.5}, r"alpha must be in \[0, 1\]"),
    ({"alpha": -0.1}, r"alpha must be in \[0, 1\]"),
    ({"strategy": "hired-reference", "newlines": "keep"}, r"emits no newline tokens"),
])
def test_bad_selection_flags(tiny_recipe, flags, message):
    with pytest.raises(ConfigError, match=message):
        tiny_recipe(0.2).override(**flags)
