"""The recipe's `[rewrites]` table + calibration stats -> an explicit per-layer record -> applied passes.

The record (`LMLayer` per source layer) is what the manifest stores under `layers.lm`: which KV
groups and query heads each language-model layer keeps and whether it runs. Applying a record needs
no statistics, so `compare` rebuilds the exported model from the manifest alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from edgeprune.errors import ConfigError
from edgeprune.rewrites import RewriteReport, lm_layers
from edgeprune.rewrites.heads import check_kept, choose_kv_groups, kv_group_counts, prune_lm_heads, prune_vision_heads, \
    vision_layers
from edgeprune.rewrites.layers import VISION_PART, check_skipped, least_influential, skip_lm_layers, skip_vision_layers


@dataclass(frozen=True)
class LMLayer:
    source_layer: int  # index in the source model
    runs: bool  # False: skipped (no graph layer, no cache buffer)
    kv_groups_kept: tuple[int, ...]  # source KV-head indices kept
    heads_kept: tuple[int, ...]  # source query-head indices kept
    folded_means: tuple[tuple[int, tuple[float, ...]], ...] = ()  # (pruned head, its mean output [Dh]) folded into o_proj

    def to_dict(self) -> dict:
        return {"source_layer": self.source_layer, "runs": self.runs, "kv_groups_kept": list(self.kv_groups_kept),
                "heads_kept": list(self.heads_kept), "folded_means": {str(h): list(m) for h, m in self.folded_means}}


@dataclass(frozen=True)
class VisionLayer:
    source_layer: int  # CLIP layer index (only layers up to the feature layer are recorded)
    heads_kept: tuple[int, ...]
    runs: bool = True  # False: skipped

    def to_dict(self) -> dict:
        return {"source_layer": self.source_layer, "heads_kept": list(self.heads_kept), "runs": self.runs}


def _group_size(model) -> int:
    return lm_layers(model)[0].self_attn.num_key_value_groups


def identity_record(model) -> list[LMLayer]:
    g = _group_size(model)
    return [LMLayer(i, True, tuple(range(n)), tuple(range(n * g))) for i, n in enumerate(kv_group_counts(model))]


def head_scores(stats: dict, criterion: str) -> list[list[float]]:
    """Per LM layer, per query head: higher = more important, by the recipe's `head_criterion`."""
    lm = stats["lm"]
    if criterion == "output-norm":
        return lm["head_output_norm"]
    if criterion == "first-token":  # dormant heads park their attention on the first token
        return [[1.0 - m for m in row] for row in lm["head_first_token_mass"]]
    return lm["head_visual_mass"]  # "visual": heads that ignore the image go first (YOPO)


def plan_lm(model, rewrites, stats_for: Callable[[], dict]) -> list[LMLayer]:
    """The per-layer record for the recipe's `rewrites` (a RewritesRecipe) on the unrewritten `model`.

    `stats_for()` returns calibration stats (already checked to fit the model); it is called only when
    a rewrite needs scores. ConfigError for layers that do not exist or a rewrite that removes everything."""
    from edgeprune.calibrate import check_stats_fit

    record = identity_record(model)
    n, g = len(record), _group_size(model)
    stats = None
    if rewrites.prune_heads > 0 or rewrites.skip_layers > 0:
        stats = stats_for()
        check_stats_fit(stats, n, [len(r.heads_kept) for r in record])
    kept = [list(r.kv_groups_kept) for r in record]
    if rewrites.prune_heads > 0:
        kept = choose_kv_groups(head_scores(stats, rewrites.head_criterion), g, rewrites.prune_heads)
    skip = list(rewrites.skip_layer_indices)
    if rewrites.skip_layers > 0:
        skip = least_influential(stats["lm"]["block_influence"], rewrites.skip_layers)
    check_skipped(skip, n)
    record = [LMLayer(i, i not in skip, tuple(k), tuple(grp * g + j for grp in k for j in range(g)))
              for i, k in enumerate(kept)]
    if rewrites.fold_pruned_heads and rewrites.prune_heads > 0:
        means = stats["lm"].get("head_output_mean")
        dh = lm_layers(model)[0].self_attn.head_dim
        if not isinstance(means, list) or [[len(m) for m in row] for row in means] != [[dh] * len(r) for r in
                                                                                        stats["lm"]["head_output_norm"]]:
            raise ConfigError("the stats have no per-head mean outputs (lm.head_output_mean) for fold_pruned_heads; "
                              "re-run `edgeprune calibrate` on this model")
        record = [LMLayer(r.source_layer, r.runs, r.kv_groups_kept, r.heads_kept,
                          tuple((h, tuple(float(v) for v in means[r.source_layer][h]))
                                for h in range(len(means[r.source_layer])) if h not in r.heads_kept))
                  for r in record]
    return record


def _feature_layers(model) -> int:
    from edgeprune.graphs import feature_layer_count

    return feature_layer_count(model.config)


def identity_vision_record(model) -> list[VisionLayer]:
    return [VisionLayer(i, tuple(range(layer.self_attn.num_heads)))
            for i, layer in enumerate(vision_layers(model, _feature_layers(model)))]


def plan_vision(model, rewrites, stats_for: Callable[[], dict]) -> list[VisionLayer]:
    """Heads kept in each CLIP layer up to the feature layer: floor(prune_vision_heads x heads) pruned per
    layer, the lowest first by output norm (or, with head_criterion "first-token", the most dormant); and
    which of those layers run (skip_vision_layers: the least influential; skip_vision_layer_indices)."""
    record = identity_vision_record(model)
    skip = list(rewrites.skip_vision_layer_indices)
    if rewrites.skip_vision_layers > 0:
        v = stats_for().get("vision")
        influence = v.get("block_influence") if isinstance(v, dict) else None
        if not isinstance(influence, list) or len(influence) != len(model.model.vision_tower.encoder.layers):
            raise ConfigError("stats are from another model (vision tower layer count differs); run `edgeprune "
                              "calibrate` on this model")
        skip = least_influential(influence[: len(record)], rewrites.skip_vision_layers, VISION_PART,
                                 "--skip-vision-layers")
    check_skipped(skip, len(record), VISION_PART, "--skip-vision-layers")
    record = [VisionLayer(r.source_layer, r.heads_kept, r.source_layer not in skip) for r in record]
    if rewrites.prune_vision_heads <= 0:
        return record
    v = stats_for().get("vision")
    key = "head_first_token_mass" if rewrites.head_criterion == "first-token" else "head_output_norm"
    heads = [len(r.heads_kept) for r in record]
    if not isinstance(v, dict) or not isinstance(v.get(key), list) or len(v[key]) < len(record) \
            or [len(row) for row in v[key][: len(record)]] != heads:
        raise ConfigError(f"stats are from another model (vision tower heads differ from {heads} in the first "
                          f"{len(record)} layers); run `edgeprune calibrate` on this model")
    rows = v[key][: len(record)]
    scores = [[1.0 - m for m in row] for row in rows] if key == "head_first_token_mass" else rows
    kept = choose_kv_groups(scores, 1, rewrites.prune_vision_heads, flag="--prune-vision-heads")
    return [VisionLayer(r.source_layer, tuple(k), r.runs) for r, k in zip(record, kept)]


def apply_vision_record(model, record: list[VisionLayer]) -> list[RewriteReport]:
    """Applies the vision record to an unrewritten `model` in place: heads, then layers (source indices).
    ConfigError when it does not fit."""
    if [r.source_layer for r in record] != list(range(_feature_layers(model))):
        raise ConfigError(f"the rewrite record describes {len(record)} vision layers, the model uses "
                          f"{_feature_layers(model)}; load the bundle's source model")
    heads = prune_vision_heads(model, [r.heads_kept for r in record])
    return [heads, skip_vision_layers(model, [r.source_layer for r in record if not r.runs])]


def vision_record_from_dicts(rows, where: str) -> list[VisionLayer]:
    try:
        return [VisionLayer(int(r["source_layer"]), tuple(int(h) for h in r["heads_kept"]), bool(r.get("runs", True)))
                for r in rows]
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: malformed layers.vision entry ({e}); re-export the bundle") from None


def apply_record(model, record: list[LMLayer]) -> list[RewriteReport]:
    """Applies a record to an unrewritten `model` in place: heads first (source indices), then layers.

    ConfigError when the record does not fit the model (another layer or head count)."""
    groups = kv_group_counts(model)
    if [r.source_layer for r in record] != list(range(len(groups))):
        raise ConfigError(f"the rewrite record describes {len(record)} language-model layers, the model has "
                          f"{len(groups)}; load the bundle's source model")
    check_kept([r.kv_groups_kept for r in record], groups)
    heads = prune_lm_heads(model, [r.kv_groups_kept for r in record], [dict(r.folded_means) for r in record])
    layers = skip_lm_layers(model, [r.source_layer for r in record if not r.runs])
    return [heads, layers]


def record_from_dicts(rows, where: str) -> list[LMLayer]:
    """The manifest's `layers.lm` list back as LMLayer records. ConfigError for a malformed entry."""
    try:
        return [LMLayer(int(r["source_layer"]), bool(r["runs"]), tuple(int(g) for g in r["kv_groups_kept"]),
                        tuple(int(h) for h in r["heads_kept"]),
                        tuple((int(h), tuple(float(v) for v in m)) for h, m in r.get("folded_means", {}).items()))
                for r in rows]
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: malformed layers.lm entry ({e}); re-export the bundle") from None


def stats_loader(rewrites, loaded, on_progress: Callable[[int, int], None] = lambda i, n: None) -> Callable[[], dict]:
    """stats_for() for `plan_lm`: the recipe's stats file, else calibration on the built-in samples (once)."""
    found = []

    def stats_for() -> dict:
        from edgeprune.calibrate import builtin_samples, calibrate, load_stats

        if not found:
            found.append(load_stats(rewrites.stats) if rewrites.stats else calibrate(loaded, builtin_samples(), on_progress))
        return found[0]

    return stats_for


def rewrite_for_export(loaded, rewrites, copy: bool) -> tuple[object, list[LMLayer], list[VisionLayer], list[RewriteReport]]:
    """(model to export, its LM and vision records, what each pass changed) for a RewritesRecipe.

    With no rewrite active the loaded model itself comes back untouched. Otherwise the passes edit a
    deep copy when `copy` (the caller keeps using its model) or `loaded.model` in place."""
    import copy as _copy

    model = loaded.model
    stats_for = stats_loader(rewrites, loaded)
    record = plan_lm(model, rewrites, stats_for)
    vision = plan_vision(model, rewrites, stats_for)
    if record == identity_record(model) and vision == identity_vision_record(model):
        return model, record, vision, []
    if copy:
        model = _copy.deepcopy(model)
    reports = [*apply_vision_record(model, vision), *apply_record(model, record)]
    return model, record, vision, [r for r in reports if r]
