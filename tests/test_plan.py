"""Plan: K and every static size, checked where a bug would show.

K = round(budget x P x N). The tested budgets are chosen so that budget x P x N is *not* a whole
number (41.6, 105.6, 547.2 ...): truncation, ceil or an off-by-one in the rounding changes K. The
expected K comes from exact rational arithmetic (fractions.Fraction on the budget written as a
decimal), never from the formula in edgeprune/plan.py.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from example_counts import examples

from edgeprune.errors import ConfigError
from edgeprune.plan import plan_shapes, visual_topk


def nearest_int(budget: str, tokens: int) -> int:
    """The integer nearest to budget x tokens, exactly (budget as a decimal string; no ties are tested)."""
    x = Fraction(budget) * tokens
    k = (2 * x.numerator + x.denominator) // (2 * x.denominator)  # floor(x + 1/2)
    assert x - k != Fraction(1, 2), "a tie: choose another budget"
    return k


# budget -> K for the tiny twin (5 partitions x 64 patches = 320) and LLaVA-1.6 (5 x 576 = 2880),
# each written out from budget x tokens: the fractional part decides, and it is >= .5 or < .5 on purpose.
TINY_K = {"0.13": 42, "0.33": 106, "0.07": 22, "0.19": 61, "0.011": 4, "0.2": 64}  # 41.6 105.6 22.4 60.8 3.52 64.0
LLAVA16_K = {"0.07": 202, "0.19": 547, "0.17": 490, "0.11": 317, "0.2": 576}  # 201.6 547.2 489.6 316.8 576.0


@pytest.mark.parametrize("budget, k", sorted(TINY_K.items()))
def test_visual_topk_tiny(budget, k):
    assert nearest_int(budget, 320) == k  # the table above is right
    assert visual_topk(float(budget), 5, 64) == k


@pytest.mark.parametrize("budget, k", sorted(LLAVA16_K.items()))
def test_visual_topk_llava16(budget, k):
    assert nearest_int(budget, 2880) == k
    assert visual_topk(float(budget), 5, 576) == k


@settings(max_examples=examples(300), deadline=None)
@given(milli=st.integers(min_value=1, max_value=1000), partitions=st.sampled_from([3, 5, 7]),
       patches=st.sampled_from([64, 576]))
def test_visual_topk_is_the_nearest_integer(milli, partitions, patches):
    """Every budget with three decimals: K is the integer nearest budget x P x N (none of these are ties:
    P x N x milli / 1000 has a fractional part that is a multiple of 1/125 for these sizes, never 1/2)."""
    budget = f"{milli / 1000:.3f}"
    expected = nearest_int(budget, partitions * patches)
    if expected < 1:
        with pytest.raises(ConfigError, match="keeps no visual token"):
            visual_topk(float(budget), partitions, patches)
    else:
        assert visual_topk(float(budget), partitions, patches) == expected


@pytest.mark.parametrize("budget", [0.001, 0.0015])  # 0.32 and 0.48 tokens: both round to 0
def test_budget_keeping_no_token_is_refused(budget):
    with pytest.raises(ConfigError, match=r"budget .* keeps no visual token \(K = 0 of 320\); raise --budget"):
        visual_topk(budget, 5, 64)


def test_smallest_budget_keeping_one_token():
    assert visual_topk(0.0016, 5, 64) == 1  # 0.512 tokens rounds up to one


@pytest.mark.parametrize("budget, newlines", [("0.13", "auto"), ("0.33", "keep"), ("1.0", "auto"), ("0.19", "drop")])
def test_plan_shapes_of_the_tiny_twin(tiny, tiny_recipe, budget, newlines):
    """Every static size, from the tiny twin's config (CLIP 112 px / patch 14: an 8 x 8 grid; pinpoints up to
    2x2 crops: 5 partitions, 16 stitched rows) and its recipe (16 + 32 text slots, 64 new-token slots)."""
    recipe = tiny_recipe(float(budget)).override(newlines=newlines)
    s = plan_shapes(tiny.config, tiny.processor.image_processor, recipe)
    k = nearest_int(budget, 5 * 64)
    rows = 16 if newlines == "keep" or (newlines == "auto" and budget == "1.0") else 0
    assert (s.partitions, s.crop_size, s.patch_grid, s.patches_per_partition) == (5, 112, 8, 64)
    assert (s.visual_topk, s.newline_slots, s.visual_slots) == (k, rows, k + rows)
    assert (s.text_slots_before_image, s.text_slots_after_image) == (16, 32)
    assert s.prefill_slots == 16 + k + rows + 32
    assert s.cache_capacity == 16 + k + rows + 32 + 64
    text = tiny.config.text_config
    assert (s.hidden_size, s.vocab_size, s.num_layers) == (128, text.vocab_size, 2)
    assert s.kv_heads == (2, 2) and s.head_dim == 128 // 4


def test_plan_shapes_of_llava16_dimensions(tiny_recipe):
    """CLIP-L/14-336 (24 x 24 patches) with LLaVA-1.6's pinpoints (up to 1x3/3x1 and 2x2: 5 partitions,
    3 x 24 = 72 stitched rows at most), from a config alone (no weights)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig

    from edgeprune.models.llava_next import LLAVA_16_PINPOINTS, _twin_processor

    config = LlavaNextConfig(vision_config=CLIPVisionConfig(image_size=336, patch_size=14),
                             text_config=LlamaConfig(vocab_size=32064, hidden_size=4096, num_attention_heads=32,
                                                     num_key_value_heads=8, num_hidden_layers=3),
                             image_grid_pinpoints=LLAVA_16_PINPOINTS, vision_feature_layer=-2)
    processor = _twin_processor(336, LLAVA_16_PINPOINTS).image_processor
    for budget, newlines, rows in (("0.19", "auto", 0), ("0.07", "keep", 72)):
        s = plan_shapes(config, processor, tiny_recipe(float(budget)).override(newlines=newlines))
        k = nearest_int(budget, 5 * 576)
        assert (s.partitions, s.patch_grid, s.patches_per_partition) == (5, 24, 576)
        assert (s.visual_topk, s.newline_slots) == (k, rows)
        assert s.kv_heads == (8, 8, 8) and s.head_dim == 128 and s.num_layers == 3


def test_plan_refuses_a_processor_that_disagrees_with_the_config(tiny, tiny_recipe):
    from edgeprune.errors import ModelLoadError
    from edgeprune.models.llava_next import _twin_processor

    other = _twin_processor(112, [[112, 224], [224, 112]]).image_processor  # pinpoints differ
    with pytest.raises(ModelLoadError, match="disagrees with the model config"):
        plan_shapes(tiny.config, other, tiny_recipe(0.2))


def _config(**changes):
    """A LlavaNextConfig-shaped namespace of the tiny twin's sizes (plan_shapes reads attributes only)."""
    from types import SimpleNamespace

    text = SimpleNamespace(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                           vocab_size=300)
    for key in ("head_dim",):
        if key in changes:
            setattr(text, key, changes.pop(key))
    base = dict(vision_config=SimpleNamespace(image_size=112, patch_size=14, num_hidden_layers=4), text_config=text,
                image_grid_pinpoints=[[112, 224], [224, 112], [224, 224]], vision_feature_layer=-2,
                vision_feature_select_strategy="default")
    return SimpleNamespace(**(base | changes))


def _processor(crop: int = 112, pinpoints=((112, 224), (224, 112), (224, 224))):
    from types import SimpleNamespace

    return SimpleNamespace(crop_size={"height": crop, "width": crop}, image_grid_pinpoints=[list(p) for p in pinpoints])


def test_head_dim_from_the_config_or_hidden_over_heads(tiny_recipe):
    recipe = tiny_recipe(0.2)
    explicit = plan_shapes(_config(head_dim=48), _processor(), recipe)  # Gemma-style: not hidden / heads
    derived = plan_shapes(_config(), _processor(), recipe)  # no head_dim attribute: 128 // 4
    assert explicit.head_dim == 48
    assert derived.head_dim == 32 and type(derived.head_dim) is int
    assert derived.kv_heads == (2, 2) and derived.vocab_size == 300


def test_processor_without_crop_size_uses_the_config(tiny_recipe):
    processor = _processor()
    processor.crop_size = None  # older processors: crop = the vision tower's image size
    assert plan_shapes(_config(), processor, tiny_recipe(0.2)).crop_size == 112


PINPOINTS = "[[112, 224], [224, 112], [224, 224]]"


@pytest.mark.parametrize("config, processor, message", [
    (_config(vision_feature_layer=[-2, -5]), _processor(), "multi-layer vision features (a list vision_feature_layer) "
                                                            "are not supported yet"),
    (_config(vision_feature_select_strategy="full"), _processor(),
     "only vision_feature_select_strategy='default' (CLS dropped) is supported"),
    (_config(), _processor(crop=224), f"the image processor (crop 224, pinpoints {PINPOINTS}) "
                                      f"disagrees with the model config (image_size 112, pinpoints {PINPOINTS})"),
    (_config(), _processor(pinpoints=((112, 224),)), f"the image processor (crop 112, pinpoints [[112, 224]]) "
                                                     f"disagrees with the model config (image_size 112, pinpoints {PINPOINTS})"),
])
def test_unsupported_configs_are_refused(tiny_recipe, config, processor, message):
    from edgeprune.errors import ModelLoadError

    with pytest.raises(ModelLoadError) as e:
        plan_shapes(config, processor, tiny_recipe(0.2))
    assert str(e.value) == message


@pytest.mark.parametrize("feature_layer, keep, message", [
    # the tiny tower has 4 layers; feature layer -2 -> the export runs layers 0..2
    (-2, "3:0.5", "vision_keep (--vision-keep) names CLIP layer 3, but the exported tower has layers 0..2 "
                  "(up to the feature layer)"),
    (2, "2:0.5", "vision_keep (--vision-keep) names CLIP layer 2, but the exported tower has layers 0..1 "
                 "(up to the feature layer)"),
    (0, "1:0.5", "vision_keep (--vision-keep) names CLIP layer 1, but the exported tower has layers 0..-1 "
                 "(up to the feature layer)"),
    # 0.1 of 64 patches = 6 per partition, 30 over 5 partitions, fewer than K = 64 at budget 0.2
    (-2, "1:0.1", "vision_keep (--vision-keep) keeps 6 tokens per partition (30 in all), fewer than the K = 64 "
                  "visual slots of the budget; keep a larger fraction or lower --budget"),
])
def test_vision_keep_is_checked_against_the_tower_and_k(tiny_recipe, feature_layer, keep, message):
    with pytest.raises(ConfigError) as e:
        plan_shapes(_config(vision_feature_layer=feature_layer), _processor(), tiny_recipe(0.2).override(vision_keep=keep))
    assert str(e.value) == message


def test_a_vision_keep_that_fits_plans_the_same_k(tiny_recipe):
    s = plan_shapes(_config(), _processor(), tiny_recipe(0.2).override(vision_keep="1:0.5"))  # 32 x 5 >= 64
    assert s.visual_topk == 64
