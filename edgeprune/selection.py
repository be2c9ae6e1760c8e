"""Visual-token selection as static graph ops: a data-dependent *choice* of exactly K slots.

A data-dependent count cannot exist in a static graph, so every strategy works the same way
(README, "Token-selection strategies"): it scores the P*N patches, turns per-partition budgets into ranks inside
each partition, and returns a *priority* per patch. The vision graph then takes one fixed-k TopK
over the priorities and sorts the winners back into sequence order. Priority bands:

    >= 3   chosen by the strategy's rule
    1..2   a real patch the rule did not choose: fills slots the rule left empty (a crop
           with fewer real patches than its share), highest score first
    0      padding, or a patch the rule forbids (hired-reference): its slot stays invalid

so exactly min(K, real patches) slots are valid for every strategy but hired-reference, which
reproduces the released code and may emit fewer.

Each implementation is listed in IMPLEMENTATIONS under its name in edgeprune.strategies, which says what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from edgeprune.strategies import SPECS, StrategySpec

CHOSEN = 3.0  # priority floor of the rule's choice
REAL = 1.0  # priority floor of any other real patch


@dataclass(frozen=True)
class SelectionParams:
    """The static knobs of a strategy (from the recipe)."""

    k: int  # slots to fill
    budget: float
    alpha: float  # hired: the base image's share of the budget
    contextual: float  # visionzip: fraction of each partition's slots given to merged contextual tokens
    seed: int  # random
    heads: int  # CLIP heads: CLS-attention sums lie in [0, heads]
    patch_grid: int  # patches per side of a partition (N = patch_grid ** 2)


@dataclass
class SelectionInputs:
    """What a strategy sees. Shapes: P partitions, N patches each, Dv CLIP width."""

    scores: torch.Tensor  # [P, N] feature layer's CLS attention, summed over heads
    valid: torch.Tensor  # [P, N] 1 = real patch
    features: torch.Tensor  # [P, N, Dv] feature-layer hidden states
    early_scores: torch.Tensor | None = None  # [P, N] layer-0 CLS attention (hired)
    keys: torch.Tensor | None = None  # [P, N, Dv] feature layer's key projections (visionzip)
    layout: dict[str, torch.Tensor] = field(default_factory=dict)  # extra layout inputs by name


@dataclass
class Selection:
    priority: torch.Tensor  # [P*N]
    features: torch.Tensor | None = None  # [P*N, Dv] when the strategy rewrites features (visionzip)
    key: torch.Tensor | None = None  # [P*N] order keys when not the layout's patch_key (hired-reference)


@dataclass(frozen=True)
class Strategy:
    spec: StrategySpec  # what it needs (torch-free, in edgeprune.strategies)
    fn: Callable[[SelectionInputs, SelectionParams], Selection]


# --- shared static building blocks ------------------------------------------------------------


def _normalised(scores: torch.Tensor, heads: int) -> torch.Tensor:
    return scores / float(heads + 1)  # CLS-attention sums in [0, heads] -> [0, 1)


def rank_within(scores: torch.Tensor, eligible: torch.Tensor) -> torch.Tensor:
    """Rank of every entry among the eligible entries of its row, best first; ties by index.

    scores/eligible [P, N] -> ranks [P, N] (float). A pairwise [P, N, N] comparison instead of a
    sort: static, scatter-free, and for N = 576 only ~1.7 M compares per partition set.
    """
    idx = torch.cumsum(torch.ones_like(scores[0]), dim=0)  # [N] 1..N, from an input: not constant-folded
    better = (scores[:, None, :] > scores[:, :, None]).to(scores.dtype)  # [P, i, j]: j beats i
    tie_first = ((scores[:, None, :] == scores[:, :, None]).to(scores.dtype)
                 * (idx[None, :] < idx[:, None]).to(scores.dtype)[None])
    return ((better + tie_first) * eligible[:, None, :]).sum(dim=-1)


def largest_remainder(weights: torch.Tensor, total: torch.Tensor | float) -> torch.Tensor:
    """Integer shares of `total` proportional to `weights` [M] that sum exactly to `total`.

    weights (counts) and total are whole numbers. floor of each exact share, then one more for the
    entries with the largest remainders (ties by index). Zero weights everywhere give zero shares.
    The remainders are kept as integers (w * total mod sum): equal remainders compare equal, where
    w / sum * total in f32 would break a tie by rounding noise.
    """
    whole = torch.clamp(weights.sum(), min=1.0)
    scaled = weights * total  # [M] whole numbers, exact in f32 below 2**24
    base = torch.floor(scaled / whole)  # exact: a non-multiple is >= 1/whole away from the next integer
    remainder = scaled - base * whole  # [M] integers in [0, whole)
    missing = torch.clamp(torch.round(total - base.sum()), min=0.0) * (weights.sum() > 0).to(weights.dtype)
    order = rank_within(remainder[None, :], torch.ones_like(remainder)[None, :])[0]
    return base + (order < missing).to(weights.dtype)


def _priority(chosen: torch.Tensor, valid: torch.Tensor, scores: torch.Tensor, heads: int) -> torch.Tensor:
    """chosen/valid/scores [P, N] -> [P*N] in the bands of the module docstring."""
    return (valid * (REAL + _normalised(scores, heads)) + chosen * (CHOSEN - REAL)).reshape(-1)


def _proportional_budgets(valid: torch.Tensor, k: int) -> torch.Tensor:
    """[P] slots per partition proportional to its real patches, summing to min(k, real patches)."""
    counts = valid.sum(dim=1)
    return largest_remainder(counts, torch.clamp(counts.sum(), max=float(k)))


# --- strategies -------------------------------------------------------------------------------


def global_topk(x: SelectionInputs, p: SelectionParams) -> Selection:
    """The K highest feature-layer CLS-attention patches over all partitions."""
    return Selection(_priority(torch.zeros_like(x.valid), x.valid, x.scores, p.heads))


def hired(x: SelectionInputs, p: SelectionParams) -> Selection:
    """HiRED with its quirks fixed (README, "Token-selection strategies").

    The base image gets B_full = min(round(K * alpha), N) slots. The crops share the rest in
    proportion to how many of the base image's top int(N * (1 - alpha)) layer-0 tokens fall in the
    part of the base image each crop covers (`base_region`), with largest-remainder rounding.
    Inside every partition the feature layer's CLS attention picks the tokens; padding never.
    """
    n_part, n = x.valid.shape
    base_slots = float(min(round(p.k * p.alpha), n))
    crop_slots = float(p.k) - base_slots
    shares = torch.zeros(n_part - 1)
    top_m = int(n * (1 - p.alpha))
    if crop_slots > 0 and top_m > 0:
        top = torch.topk(x.early_scores[0], top_m).indices  # [M] base patches by layer-0 attention
        region = x.layout["base_region"][top]  # [M] crop partition previewed by each
        crops = torch.cumsum(torch.ones_like(shares), dim=0)  # [P-1] 1..P-1
        counts = (region[None, :] == crops[:, None]).to(shares.dtype).sum(dim=1)  # [P-1]
        shares = largest_remainder(counts, crop_slots)
    budgets = torch.cat([torch.full((1,), base_slots), shares])  # [P]
    chosen = x.valid * (rank_within(x.scores, x.valid) < budgets[:, None]).to(x.valid.dtype)
    return Selection(_priority(chosen, x.valid, x.scores, p.heads))


def hired_reference(x: SelectionInputs, p: SelectionParams) -> Selection:
    """The released HiRED code's kept set, quirks included (hasanar1f/HiRED @ 42be984).

    Budget int(P * N * rate) with P this image's partitions; base min(int(total * alpha), N); crops
    share min(total - base, (P-1) N) by the count of the base image's top int(N (1 - alpha)) layer-0
    tokens in *flat raster bands* i * N/(P-1) .. (i+1) * N/(P-1), each share floored in float32
    (the remainder is lost); top-k per partition over all its patches, padding included; then the
    released packing (swapped crop stitch + old unpad, `released_valid`) drops what it cuts, and
    those slots stay invalid. No newline tokens.
    """
    n_part, n = x.valid.shape
    real = x.layout["partition_real"]  # [P]
    p_act = real.sum()
    # Budgets as the released Python computes them, tabulated per partition count (exact ints).
    totals = [int(q * n * p.budget) for q in range(n_part + 1)]
    base_tab = torch.tensor([float(min(int(t * p.alpha), n)) for t in totals])
    crop_tab = torch.tensor([float(min(t - min(int(t * p.alpha), n), max(q - 1, 0) * n)) for q, t in enumerate(totals)])
    q_idx = p_act.to(torch.int64)
    base_slots, crop_slots = base_tab[q_idx], crop_tab[q_idx]

    top_m = int(n * (1 - p.alpha))
    shares = torch.zeros(n_part - 1)
    if top_m > 0:
        top = torch.topk(x.early_scores[0], top_m).indices.to(torch.float32)  # [M] flat base indices
        band = torch.floor(top / (float(n) / torch.clamp(p_act - 1.0, min=1.0)))  # [M] 0..P-2
        crops = torch.cumsum(torch.ones_like(shares), dim=0) - 1.0  # [P-1] 0..P-2
        counts = (band[None, :] == crops[:, None]).to(torch.float32).sum(dim=1) * real[1:]  # [P-1]
        ratio = counts / torch.clamp(counts.sum(), min=1.0)  # float32, as torch's int64 true division
        shares = torch.clamp(torch.floor(ratio * crop_slots), max=float(n)) * (crop_slots > 0).to(torch.float32)
    budgets = torch.cat([base_slots[None], shares]) * real  # [P]
    everything = torch.ones_like(x.valid)  # the released top-k ranks padding patches too
    chosen = (rank_within(x.scores, everything) < budgets[:, None]).to(x.valid.dtype) * real[:, None]
    kept = chosen * x.layout["released_valid"]
    priority = (kept * (CHOSEN + _normalised(x.scores, p.heads))).reshape(-1)
    return Selection(priority, key=x.layout["released_key"].reshape(-1))


def _morton(grid: int) -> np.ndarray:
    """Z-order index of every patch of a grid x grid partition, raster order [N]."""
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    code = np.zeros(grid * grid, np.int64)
    for bit in range(int(grid - 1).bit_length()):
        code |= ((cols >> bit) & 1) << (2 * bit) | ((rows >> bit) & 1) << (2 * bit + 1)
    return code


def uniform(x: SelectionInputs, p: SelectionParams) -> Selection:
    """Evenly spread, ignoring attention: each partition's share (proportional to its real patches)
    at an even stride along the Z-order (Morton) curve through its real patches. The curve keeps
    neighbours close in both directions, so an even stride along it spreads the picks over the
    area; a stride in raster order instead lines them up in columns when it divides the row."""
    budgets = _proportional_budgets(x.valid, p.k)  # [P]
    morton = torch.from_numpy(_morton(p.patch_grid).astype(np.float32))  # [N], a constant in the graph
    pos = rank_within(-morton[None, :].expand_as(x.valid), x.valid)  # [P, N] index along the curve
    real = torch.clamp(x.valid.sum(dim=1, keepdim=True), min=1.0)  # [P, 1]
    # pick j of n iff floor((j+1) b / n) > floor(j b / n). Multiply before dividing: the products are exact
    # integers in f32, so the last step lands on b exactly (b * (1 / n) * n can fall just short of b).
    b = budgets[:, None]
    chosen = x.valid * (torch.floor((pos + 1.0) * b / real) > torch.floor(pos * b / real)).to(x.valid.dtype)
    return Selection(_priority(chosen, x.valid, x.scores, p.heads))


def random(x: SelectionInputs, p: SelectionParams) -> Selection:
    """K real patches drawn uniformly at random (seeded at export: one fixed draw per bundle)."""
    draw = np.random.default_rng(p.seed).random(tuple(x.valid.shape), dtype=np.float32)
    noise = torch.from_numpy(draw)  # drawn at export time: a constant in the graph, not a traced RNG op
    return Selection((x.valid * (REAL + noise)).reshape(-1))


def visionzip(x: SelectionInputs, p: SelectionParams) -> Selection:
    """VisionZip per partition: dominant tokens by CLS attention, plus contextual tokens.

    Each partition's share (proportional to its real patches) splits into round(share *
    contextual) contextual slots and the rest dominant. The non-dominant real patches are
    spread evenly over the contextual targets' positions (every step-th in raster order); every
    other non-dominant patch joins the target whose key (feature layer, cosine) is most similar,
    and each target becomes target + mean(joined), as in VisionZip's merge.
    """
    budgets = _proportional_budgets(x.valid, p.k)  # [P]
    ctx = torch.floor(budgets * p.contextual + 0.5)
    dominant_n = budgets - ctx
    dominant = x.valid * (rank_within(x.scores, x.valid) < dominant_n[:, None]).to(x.valid.dtype)
    rest = x.valid - dominant  # [P, N]
    rest_n = rest.sum(dim=1)
    step = torch.clamp(torch.floor(rest_n / torch.clamp(ctx, min=1.0)), min=1.0)  # [P]
    pos = torch.cumsum(rest, dim=1) - 1.0
    target = rest * (torch.remainder(pos, step[:, None]) == 0).to(rest.dtype) * (
        torch.floor(pos / step[:, None]) < ctx[:, None]).to(rest.dtype)
    merge = rest - target  # [P, N] tokens folded into a target

    k = x.keys / torch.clamp(x.keys.norm(dim=-1, keepdim=True), min=1e-6)
    sim = torch.matmul(k, k.transpose(1, 2))  # [P, N(from), N(to)]
    sim = sim + (target[:, None, :] - 1.0) * 1e4  # only targets can receive
    best = torch.max(sim, dim=-1, keepdim=True).values
    assign = (sim >= best).to(rest.dtype)
    assign = assign / torch.clamp(assign.sum(dim=-1, keepdim=True), min=1.0) * merge[:, :, None]  # [P, N, N]
    joined = assign.sum(dim=1)  # [P, N] members per target
    mean = torch.matmul(assign.transpose(1, 2), x.features) / torch.clamp(joined, min=1.0)[:, :, None]
    features = x.features + mean * (joined > 0).to(rest.dtype)[:, :, None] * target[:, :, None]
    chosen = dominant + target
    return Selection(_priority(chosen, x.valid, x.scores, p.heads),
                     features=features.reshape(-1, features.shape[-1]))


# Each implementation under the name edgeprune.strategies.SPECS declares (a table, not decorators: mutmut
# does not mutate decorated functions, and these are the functions whose every detail matters).
IMPLEMENTATIONS = {
    "hired": hired,
    "hired-reference": hired_reference,
    "visionzip": visionzip,
    "global-topk": global_topk,
    "uniform": uniform,
    "random": random,
}
STRATEGIES: dict[str, Strategy] = {name: Strategy(SPECS[name], fn) for name, fn in IMPLEMENTATIONS.items()}
assert set(STRATEGIES) == set(SPECS), "every strategy in edgeprune.strategies needs an implementation here"


def get_strategy(name: str) -> Strategy:
    return STRATEGIES[name]
