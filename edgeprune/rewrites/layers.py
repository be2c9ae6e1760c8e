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


def check_skipped(skip: Sequence[int], count: int) -> None:
    bad = [i for i in skip if not (0 <= i < count)]
    if bad:
        raise ConfigError(f"--skip-layers: the language model has layers 0..{count - 1}; there is no layer {bad[0]}")
    if len(set(skip)) != len(skip):
        raise ConfigError(f"--skip-layers names a layer twice: {sorted(skip)}")
    if len(skip) >= count:
        raise ConfigError(f"--skip-layers would skip all {count} language-model layers; keep at least one")


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


def least_influential(influence: Sequence[float], n: int) -> list[int]:
    """The `n` layers with the lowest block influence (1 - cos(h_in, h_out)); the earlier one on ties."""
    if n < 0:
        raise ConfigError(f"--skip-layers must be >= 0, got {n}")
    check_skipped(list(range(n)), len(influence))  # all layers -> refused
    return sorted(sorted(range(len(influence)), key=lambda i: (influence[i], i))[:n])
