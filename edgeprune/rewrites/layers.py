"""Static language-model layer skipping: chosen layers leave the ModuleList.

The remaining layers are renumbered (`layer_idx` of the layer and its attention, which index
transformers' KV cache) and `text_config.num_hidden_layers` follows, so transformers' own forward
and generate run the shorter model: the reference for the exported graphs, which have one K/V pair
per remaining layer.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from edgeprune.errors import ConfigError
from edgeprune.rewrites import RewriteReport, lm_layers


def check_skipped(skip: Sequence[int], count: int, part: str = "the language model", flag: str = "--skip-layers") -> None:
    bad = [i for i in skip if not (0 <= i < count)]
    if bad:
        raise ConfigError(f"{flag}: {part} has layers 0..{count - 1}; there is no layer {bad[0]}")
    if len(set(skip)) != len(skip):
        raise ConfigError(f"{flag} names a layer twice: {sorted(skip)}")
    if len(skip) >= count:
        raise ConfigError(f"{flag} would skip all {count} layers of {part}; keep at least one")


def skip_lm_layers(model, skip: Sequence[int]) -> RewriteReport:
    """Removes LM layers `skip` (current indices) from `model` in place. ConfigError for unknown layers or all."""
    layers = lm_layers(model)
    check_skipped(skip, len(layers))
    report = RewriteReport("skip-layers")
    if not skip:
        return report
    kept = [layer for i, layer in enumerate(layers) if i not in set(skip)]
    for new, layer in enumerate(kept):
        layer.layer_idx = new
        layer.self_attn.layer_idx = new
    model.model.language_model.layers = nn.ModuleList(kept)
    for config in {id(c): c for c in (model.config.text_config, model.model.language_model.config)}.values():
        config.num_hidden_layers = len(kept)
    report.changes.append(f"layers {sorted(skip)} skipped, {len(kept)} of {len(layers)} run")
    return report


VISION_PART = "the vision tower (up to the feature layer)"


def skip_vision_layers(model, skip: Sequence[int]) -> RewriteReport:
    """Removes CLIP layers `skip` (indices below the feature layer's count) from `model` in place.

    `vision_config.num_hidden_layers` follows; a non-negative `vision_feature_layer` moves down by the
    skipped count (a negative one, LLaVA's -2, still names the same layer counted from the end), so
    transformers' `hidden_states[vision_feature_layer]` is the same feature layer, minus the skipped ones."""
    from edgeprune.graphs import feature_layer_count

    used = feature_layer_count(model.config)
    check_skipped(skip, used, VISION_PART, "--skip-vision-layers")
    report = RewriteReport("skip-vision-layers")
    if not skip:
        return report
    tower = model.model.vision_tower
    total = len(tower.encoder.layers)
    tower.encoder.layers = nn.ModuleList([layer for i, layer in enumerate(tower.encoder.layers) if i not in set(skip)])
    model.config.vision_config.num_hidden_layers = total - len(skip)
    if model.config.vision_feature_layer >= 0:
        model.config.vision_feature_layer -= len(skip)
    report.changes.append(f"vision layers {sorted(skip)} skipped, {used - len(skip)} of {used} run up to the feature layer")
    return report


def least_influential(influence: Sequence[float], n: int, part: str = "the language model",
                      flag: str = "--skip-layers") -> list[int]:
    """The `n` layers with the lowest block influence (1 - cos(h_in, h_out)); the earlier one on ties."""
    if n < 0:
        raise ConfigError(f"{flag} must be >= 0, got {n}")
    check_skipped(list(range(n)), len(influence), part, flag)  # all layers -> refused
    return sorted(sorted(range(len(influence)), key=lambda i: (influence[i], i))[:n])
