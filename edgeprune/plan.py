"""Plan: the recipe and the model's config fixed into one frozen `Shapes` (every static size)."""

from __future__ import annotations

from edgeprune.errors import ConfigError, ModelLoadError
from edgeprune.recipe import Recipe
from edgeprune_runtime.layout import max_newline_rows, max_partitions
from edgeprune_runtime.manifest import Shapes


def visual_topk(budget: float, partitions: int, patches: int) -> int:
    """K = round(budget x patch tokens of all partitions); at least one token."""
    k = round(budget * partitions * patches)
    if k < 1:
        raise ConfigError(f"budget {budget} keeps no visual token (K = 0 of {partitions * patches}); raise --budget")
    return k


def plan_shapes(config, image_processor, recipe: Recipe) -> Shapes:
    """All static sizes for `config` (LlavaNextConfig) under `recipe`."""
    vision, text = config.vision_config, config.text_config
    if not isinstance(config.vision_feature_layer, int):
        raise ModelLoadError("multi-layer vision features (a list vision_feature_layer) are not supported yet")
    if config.vision_feature_select_strategy != "default":
        raise ModelLoadError("only vision_feature_select_strategy='default' (CLS dropped) is supported")
    crop = vision.image_size
    processor_crop = (image_processor.crop_size or {}).get("height", crop)
    if processor_crop != crop or [list(p) for p in image_processor.image_grid_pinpoints] != [list(p) for p in config.image_grid_pinpoints]:
        raise ModelLoadError(f"the image processor (crop {processor_crop}, pinpoints {image_processor.image_grid_pinpoints}) "
                             f"disagrees with the model config (image_size {crop}, pinpoints {config.image_grid_pinpoints})")
    grid = crop // vision.patch_size
    patches = grid * grid
    pinpoints = config.image_grid_pinpoints
    partitions = max_partitions(pinpoints, crop)
    k = visual_topk(recipe.budget, partitions, patches)
    from edgeprune.vision_prune import keep_counts

    layer = config.vision_feature_layer  # CLIP layers the exported tower runs (graphs.feature_layer_count)
    keep_counts(recipe.vision_keep, patches, layer if layer >= 0 else vision.num_hidden_layers + 1 + layer, partitions, k)
    newline_rows = max_newline_rows(pinpoints, crop, grid) if recipe.keeps_newlines() else 0
    visual = k + newline_rows
    t1, t2 = recipe.shapes.text_slots_before_image, recipe.shapes.text_slots_after_image
    prefill = t1 + visual + t2
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return Shapes(
        partitions=partitions,
        crop_size=crop,
        patch_grid=grid,
        patches_per_partition=patches,
        visual_topk=k,
        newline_slots=newline_rows,
        visual_slots=visual,
        text_slots_before_image=t1,
        text_slots_after_image=t2,
        prefill_slots=prefill,
        cache_capacity=prefill + recipe.shapes.new_token_slots,
        hidden_size=text.hidden_size,
        vocab_size=text.vocab_size,
        num_layers=text.num_hidden_layers,
        kv_heads=tuple([text.num_key_value_heads] * text.num_hidden_layers),
        head_dim=head_dim,
    )
