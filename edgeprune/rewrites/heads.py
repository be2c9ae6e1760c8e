"""Language-model head pruning by KV group: pruned heads cost nothing and the KV cache shrinks.

Grouped-query attention shares one K/V head among G query heads, so the unit of pruning is a KV
group: KV head g and its query heads g*G .. g*G+G-1. Keeping groups `kept` (sorted) of a layer:

    q_proj.weight [H*Dh, D]    -> rows of heads {g*G+j}        [len(kept)*G*Dh, D]
    k_proj/v_proj [Hkv*Dh, D]  -> rows of KV heads {g}          [len(kept)*Dh, D]
    o_proj.weight [D, H*Dh]    -> columns of heads {g*G+j}      [D, len(kept)*G*Dh]

G (`num_key_value_groups`) is unchanged, and transformers' attention views q/k/v as (-1, Dh), so
its own forward runs on the sliced modules unchanged. A layer keeps at least one group.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from edgeprune.errors import ConfigError
from edgeprune.rewrites import RewriteReport, lm_layers


def _rows(indices: Sequence[int], width: int) -> torch.Tensor:
    """Row indices of heads `indices`, each `width` rows wide."""
    return torch.cat([torch.arange(i * width, (i + 1) * width) for i in indices])


def _folded_bias(o_proj: nn.Linear, dh: int, means: dict[int, Sequence[float]]) -> torch.Tensor | None:
    """o_proj's bias plus the pruned heads' mean contribution, or None when there is neither."""
    if not means:
        return None if o_proj.bias is None else o_proj.bias.detach()
    w = o_proj.weight.detach()
    extra = sum(w[:, h * dh:(h + 1) * dh] @ torch.tensor(m, dtype=w.dtype) for h, m in sorted(means.items()))  # [D]
    return extra if o_proj.bias is None else o_proj.bias.detach() + extra


def _sliced(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
            bias: torch.Tensor | None | str = "same") -> nn.Linear:
    w = linear.weight.detach()
    b = None if linear.bias is None else linear.bias.detach()
    if not isinstance(bias, str):
        b = bias
    if rows is not None:
        w = w[rows]
        b = None if b is None else b[rows]
    if cols is not None:
        w = w[:, cols]
    out = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        out.weight.copy_(w)
        if b is not None:
            out.bias.copy_(b)
    return out


def kv_group_counts(model) -> list[int]:
    """KV groups (KV heads) of each language-model layer now."""
    return [layer.self_attn.k_proj.out_features // layer.self_attn.head_dim for layer in lm_layers(model)]


def check_kept(kept: Sequence[Sequence[int]], groups: Sequence[int], part: str = "language model",
               unit: str = "KV group", flag: str = "--prune-heads") -> None:
    """ConfigError unless `kept` names, per layer, a non-empty set of existing groups (heads)."""
    if len(kept) != len(groups):
        raise ConfigError(f"head pruning names {len(kept)} layers, the {part} has {len(groups)}")
    for i, (k, n) in enumerate(zip(kept, groups)):
        if not k:
            raise ConfigError(f"head pruning would remove every {unit} of {part} layer {i}; keep at least one "
                              f"(a {flag} ratio below 1)")
        bad = [g for g in k if not (0 <= g < n)]
        if bad or len(set(k)) != len(k):
            raise ConfigError(f"{part} layer {i} has {unit}s 0..{n - 1}; cannot keep {list(k)}")


def prune_lm_heads(model, kept: Sequence[Sequence[int]], fold: Sequence[dict[int, Sequence[float]]] | None = None
                   ) -> RewriteReport:
    """Keeps only KV groups `kept[l]` (indices into layer l's current groups) in every LM layer.

    `fold[l]` maps a pruned query head of layer l to its mean output [Dh] (calibration): o_proj gets the
    bias W_o[:, head columns] @ mean summed over those heads, the constant that best replaces them (least
    squares over the calibration tokens). Edits `model` in place. Raises ConfigError for a layer left
    without groups or unknown indices."""
    layers = lm_layers(model)
    check_kept(kept, kv_group_counts(model))
    report = RewriteReport("prune-heads")
    for i, (layer, keep) in enumerate(zip(layers, kept)):
        attn = layer.self_attn
        groups, g, dh = attn.k_proj.out_features // attn.head_dim, attn.num_key_value_groups, attn.head_dim
        keep = sorted(keep)
        if len(keep) == groups:
            continue
        heads = [grp * g + j for grp in keep for j in range(g)]
        q_rows, kv_rows = _rows(heads, dh), _rows(keep, dh)
        bias = _folded_bias(attn.o_proj, dh, fold[i] if fold else {})
        attn.q_proj = _sliced(attn.q_proj, rows=q_rows)
        attn.k_proj = _sliced(attn.k_proj, rows=kv_rows)
        attn.v_proj = _sliced(attn.v_proj, rows=kv_rows)
        attn.o_proj = _sliced(attn.o_proj, cols=q_rows, bias=bias)
        report.changes.append(f"layer {i}: {len(keep)} of {groups} KV groups kept ({keep}), "
                              f"{len(heads)} of {groups * g} query heads"
                              + (f", {len(fold[i])} pruned heads folded into the o_proj bias" if fold and fold[i] else ""))
    return report


def choose_kv_groups(scores: Sequence[Sequence[float]], group_size: int, ratio: float,
                     flag: str = "--prune-heads") -> list[list[int]]:
    """Per layer, the KV groups to keep when pruning floor(ratio x groups) of them, lowest score first.

    scores: per layer, per query head (higher = more important); a group scores the sum of its heads.
    Ties are broken by the lower index kept. ratio must be in [0, 1), so every layer keeps a group."""
    if not (0.0 <= ratio < 1.0):
        raise ConfigError(f"{flag} must be a ratio in [0, 1), got {ratio}")
    kept = []
    for heads in scores:
        n = len(heads) // group_size
        group_score = [sum(heads[g * group_size:(g + 1) * group_size]) for g in range(n)]
        drop = int(ratio * n)
        order = sorted(range(n), key=lambda g: (group_score[g], -g))  # least important first
        kept.append(sorted(order[drop:]))
    return kept


def vision_layers(model, count: int | None = None):
    """The CLIP encoder layers of a LlavaNextForConditionalGeneration (the first `count`)."""
    layers = model.model.vision_tower.encoder.layers
    return layers if count is None else layers[:count]


def prune_vision_heads(model, kept: Sequence[Sequence[int]]) -> RewriteReport:
    """Keeps only heads `kept[l]` in the first len(kept) CLIP layers (those up to the feature layer).

    CLIP attention is multi-head (no KV sharing): q/k/v rows and biases and out_proj columns of each
    kept head are kept, `num_heads` follows (CLS-attention scores for token selection sum over the
    remaining heads). Raises ConfigError for a layer left without heads or unknown indices."""
    layers = vision_layers(model, len(kept))
    counts = [layer.self_attn.num_heads for layer in layers]
    check_kept(kept, counts, "vision tower", "head", "--prune-vision-heads")
    report = RewriteReport("prune-vision-heads")
    for i, (layer, keep) in enumerate(zip(layers, kept)):
        attn = layer.self_attn
        keep = sorted(keep)
        if len(keep) == attn.num_heads:
            continue
        rows = _rows(keep, attn.head_dim)
        attn.q_proj = _sliced(attn.q_proj, rows=rows)
        attn.k_proj = _sliced(attn.k_proj, rows=rows)
        attn.v_proj = _sliced(attn.v_proj, rows=rows)
        attn.out_proj = _sliced(attn.out_proj, cols=rows)
        report.changes.append(f"vision layer {i}: {len(keep)} of {attn.num_heads} heads kept ({keep})")
        attn.num_heads = len(keep)
    return report
