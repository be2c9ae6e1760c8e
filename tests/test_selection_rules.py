"""Each selection rule against an independent plain-Python oracle, on inputs where a bug would show.

The strategies in edgeprune/selection.py are torch graph code (pairwise ranks, cumulative sums,
float masks); the oracles here are written the obvious way (sorted(), Fraction, loops) from the
rules as the README states them, and share no code with the module. Inputs are chosen so that the
answer depends on the detail under test: the base image's top layer-0 tokens fall unevenly across
the crops' regions, budgets leave remainders, partitions have padding, scores are distinct.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from example_counts import examples

from edgeprune.selection import CHOSEN, SelectionInputs, SelectionParams, get_strategy, largest_remainder, rank_within
from edgeprune_runtime.layout import compute_layout

TINY_PINPOINTS = [[112, 224], [224, 112], [224, 224]]  # the tiny twin: 8 x 8 patches, up to 2x2 crops
HEADS = 4


# --- oracles -------------------------------------------------------------------------------------


def hamilton(weights: list[int], total: int) -> list[int]:
    """Largest-remainder apportionment of `total` by `weights`, exactly: floors, then +1 to the largest
    remainders, ties to the lower index. All-zero weights get nothing."""
    s = sum(weights)
    if s == 0:
        return [0] * len(weights)
    exact = [Fraction(w * total, s) for w in weights]
    shares = [int(e) for e in exact]  # floor (non-negative)
    order = sorted(range(len(weights)), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def top_indices(values, count: int, among=None) -> list[int]:
    """Indices of the `count` largest values (ties to the lower index), optionally only among `among`."""
    pool = range(len(values)) if among is None else among
    return sorted(pool, key=lambda i: (-values[i], i))[:count]


def hired_budgets(early_base, region, k: int, alpha: Fraction, n: int, crops: int) -> list[int]:
    """Slots per partition under `hired`: base min(round(K alpha), N); the crops share the rest by how many
    of the base image's top floor(N (1 - alpha)) layer-0 tokens lie in each crop's region."""
    base = min(round(k * alpha), n)  # round(Fraction): to nearest, ties to even, as Python's round
    rest = k - base
    top_m = int(n * (1 - alpha))  # floor
    shares = [0] * crops
    if rest > 0 and top_m > 0:
        top = top_indices(early_base, top_m)
        counts = [sum(1 for i in top if region[i] == c) for c in range(1, crops + 1)]
        shares = hamilton(counts, rest)
    return [base] + shares


def chosen_by_rule(budgets, scores, valid) -> list[set[int]]:
    """Per partition: the `budget` highest-scoring real patches (all of them when fewer)."""
    out = []
    for p, b in enumerate(budgets):
        real = [i for i, v in enumerate(valid[p]) if v]
        out.append(set(top_indices(scores[p], b, among=real)))
    return out


# --- helpers -------------------------------------------------------------------------------------


def params(k: int, alpha: float = 0.5, contextual: float = 0.15, grid: int = 8) -> SelectionParams:
    return SelectionParams(k=k, budget=k / (5 * grid * grid), alpha=alpha, contextual=contextual, seed=0,
                           heads=HEADS, patch_grid=grid)


def distinct_scores(rng, shape) -> np.ndarray:
    """CLS-attention-like sums in [0, HEADS), all distinct (so no rule depends on tie-breaking)."""
    size = int(np.prod(shape))
    return (rng.permutation(size).reshape(shape) / size * HEADS).astype(np.float32)


def inputs_for(layout, scores, early, features=None, keys=None) -> SelectionInputs:
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32))  # noqa: E731
    p, n = layout.patch_valid.shape
    feats = t(features) if features is not None else torch.zeros(p, n, 4)
    return SelectionInputs(scores=t(scores), valid=t(layout.patch_valid), features=feats, early_scores=t(early),
                           keys=t(keys) if keys is not None else None,
                           layout={k: t(v) for k, v in layout.feeds().items()})


def chosen_sets(priority: torch.Tensor, p: int, n: int) -> list[set[int]]:
    mask = (priority.reshape(p, n) >= CHOSEN).numpy()
    return [set(np.flatnonzero(row).tolist()) for row in mask]


def layout_of(hw, grid: int = 8, pinpoints=TINY_PINPOINTS, crop: int = 112):
    return compute_layout(hw, pinpoints, crop, grid, 5, 0)


# --- hired: the crops' shares follow where the base image's top tokens lie ------------------------


def _early_in_regions(layout, weights: dict[int, int], rng) -> np.ndarray:
    """Layer-0 scores [P, N] whose base-image top tokens fall `weights[c]` in crop c's region."""
    n = layout.patch_valid.shape[1]
    early = distinct_scores(rng, layout.patch_valid.shape) * 0.1  # low everywhere
    region = layout.base_region.astype(int)
    value = 10.0
    for c, count in weights.items():
        idx = np.flatnonzero(region == c)
        assert len(idx) >= count, (c, count, len(idx))
        for i in rng.choice(idx, size=count, replace=False):
            early[0, i], value = value, value + 1.0  # distinct, above every other score
    assert early.shape[1] == n
    return early


@pytest.mark.parametrize("hw, weights, expected", [
    # 2x2 grid (square image): each crop previews one quadrant (16 base patches). K = 64, alpha = 0.5:
    # the base keeps 32, the crops share 32 by their count among the base's top 32 layer-0 tokens.
    ((224, 224), {1: 16, 2: 16}, [32, 16, 16, 0, 0]),
    ((224, 224), {1: 16, 4: 16}, [32, 16, 0, 0, 16]),
    ((224, 224), {2: 16, 3: 12, 4: 4}, [32, 0, 16, 12, 4]),
    ((224, 224), {1: 3, 2: 3, 3: 13, 4: 13}, [32, 3, 3, 13, 13]),
    # 1x2 grid (wide image): two crops, left and right half of the base image.
    ((100, 220), {2: 30, 1: 2}, [32, 2, 30, 0, 0]),
])
def test_hired_shares_follow_the_top_tokens(hw, weights, expected):
    """Hand-counted: with 32 crop slots and the base's top 32 tokens split as `weights`, each crop gets its count."""
    rng = np.random.default_rng(0)
    layout = layout_of(hw)
    if hw == (224, 224):
        assert layout.grid == (2, 2)
        # independent of the layout code: quadrant of a base patch on a square image
        quad = [1 + 2 * (i // 8 // 4) + (i % 8) // 4 for i in range(64)]
        assert layout.base_region.astype(int).tolist() == quad
    early = _early_in_regions(layout, weights, rng)
    scores = distinct_scores(rng, layout.patch_valid.shape)
    sel = get_strategy("hired").fn(inputs_for(layout, scores, early), params(64))
    got = [len(s) for s in chosen_sets(sel.priority, 5, 64)]
    assert got == expected
    assert got == hired_budgets(early[0].tolist(), layout.base_region.tolist(), 64, Fraction(1, 2), 64, 4)


def test_hired_splits_unevenly_with_remainders():
    """K = 58: the base keeps 29; 29 crop slots over counts 16/11/5/0 of the top 32: exact shares 14.5, 9.97,
    4.53, 0; floors 14 + 9 + 4 = 27, the two largest remainders (.97, .53) get the 2 left: 14, 10, 5, 0."""
    rng = np.random.default_rng(1)
    layout = layout_of((224, 224))
    early = _early_in_regions(layout, {1: 16, 2: 11, 3: 5}, rng)
    scores = distinct_scores(rng, layout.patch_valid.shape)
    sel = get_strategy("hired").fn(inputs_for(layout, scores, early), params(58))  # base round(29) = 29
    got = [len(s) for s in chosen_sets(sel.priority, 5, 64)]
    assert got == [29, 14, 10, 5, 0]


IMAGE_SIZES = [(224, 224), (100, 220), (220, 100), (60, 200), (300, 90), (180, 150), (150, 180), (112, 113)]
ALPHAS = [Fraction(0), Fraction(1, 4), Fraction(3, 10), Fraction(1, 2), Fraction(3, 5), Fraction(3, 4), Fraction(1)]


@settings(max_examples=examples(150), deadline=None)
@given(hw=st.sampled_from(IMAGE_SIZES), k=st.integers(1, 320), alpha=st.sampled_from(ALPHAS),
       seed=st.integers(0, 2**32 - 1), skew=st.integers(0, 3))
@example(hw=(224, 224), k=100, alpha=Fraction(1, 2), seed=3, skew=2)  # K > N: the base is capped at N
@example(hw=(224, 224), k=50, alpha=Fraction(49, 50), seed=1, skew=1)  # floor(64 x 0.02) = 1 top token decides
def test_hired_matches_the_oracle(hw, k, alpha, seed, skew):
    """Any layout of the tiny twin's pinpoints, any K and alpha; layer-0 scores biased towards one crop's region."""
    assume(float(k * alpha) == k * float(alpha))  # the product is exact in floats too (no rounding at a tie)
    rng = np.random.default_rng(seed)
    layout = layout_of(hw)
    early = distinct_scores(rng, layout.patch_valid.shape)
    region = layout.base_region.astype(int)
    favoured = 1 + skew % (layout.grid[0] * layout.grid[1])
    early[0] += (region == favoured) * (float(rng.integers(0, 2 * HEADS)) / 2 + 1 / (3 * early.size))  # no ties
    scores = distinct_scores(rng, layout.patch_valid.shape)
    sel = get_strategy("hired").fn(inputs_for(layout, scores, early), params(k, float(alpha)))
    budgets = hired_budgets(early[0].tolist(), region.tolist(), k, alpha, 64, 4)
    assert chosen_sets(sel.priority, 5, 64) == chosen_by_rule(budgets, scores.tolist(), layout.patch_valid.tolist())
    _check_bands(sel.priority, layout.patch_valid, scores)


@settings(max_examples=examples(25), deadline=None)
@given(hw=st.sampled_from([(672, 672), (400, 1000), (1000, 330), (500, 700)]), k=st.integers(1, 2880),
       seed=st.integers(0, 2**32 - 1))
def test_hired_matches_the_oracle_llava16(hw, k, seed):
    """LLaVA-1.6 sizes: 24 x 24 patches, pinpoints up to 1x3 / 3x1 / 2x2."""
    from edgeprune.models.llava_next import LLAVA_16_PINPOINTS

    rng = np.random.default_rng(seed)
    layout = compute_layout(hw, LLAVA_16_PINPOINTS, 336, 24, 5, 0)
    early = distinct_scores(rng, layout.patch_valid.shape)
    early[0] += (layout.base_region == 1) * (2.0 + 1 / (3 * early.size))  # off the score lattice: no ties
    scores = distinct_scores(rng, layout.patch_valid.shape)
    sel = get_strategy("hired").fn(inputs_for(layout, scores, early), params(k, grid=24))
    budgets = hired_budgets(early[0].tolist(), layout.base_region.astype(int).tolist(), k, Fraction(1, 2), 576, 4)
    assert chosen_sets(sel.priority, 5, 576) == chosen_by_rule(budgets, scores.tolist(), layout.patch_valid.tolist())


def _check_bands(priority: torch.Tensor, valid: np.ndarray, scores: np.ndarray) -> None:
    """Priority bands: padding 0; a real patch the rule skipped in [1, 2); a chosen one in [3, 4);
    inside a band the order is the score's."""
    pr = priority.numpy().reshape(valid.shape)
    assert np.all(pr[valid == 0] == 0)
    real = pr[valid > 0]
    assert np.all(((real >= 1) & (real < 2)) | ((real >= 3) & (real < 4)))
    flat_s, flat_p = scores[valid > 0], real
    for band in (1, 3):
        m = (flat_p >= band) & (flat_p < band + 1)
        order_p, order_s = np.argsort(-flat_p[m], kind="stable"), np.argsort(-flat_s[m], kind="stable")
        assert np.array_equal(order_p, order_s)


# --- the other rules --------------------------------------------------------------------------------


@settings(max_examples=examples(60), deadline=None)
@given(hw=st.sampled_from(IMAGE_SIZES), k=st.integers(1, 320), seed=st.integers(0, 2**32 - 1))
def test_global_topk_picks_the_k_best_real_patches(hw, k, seed):
    rng = np.random.default_rng(seed)
    layout = layout_of(hw)
    scores = distinct_scores(rng, layout.patch_valid.shape)
    sel = get_strategy("global-topk").fn(inputs_for(layout, scores, scores), params(k))
    real = np.flatnonzero(layout.patch_valid.reshape(-1) > 0)
    flat = scores.reshape(-1)
    expected = set(top_indices(flat.tolist(), k, among=real.tolist()))
    got = set(torch.topk(sel.priority, min(k, len(real))).indices.tolist())
    assert got == expected
    _check_bands(sel.priority, layout.patch_valid, scores)


def morton_order(grid: int) -> list[int]:
    """Raster indices of a grid x grid partition in Z-order: interleave the bits of (row, col), row bit higher."""
    def code(i):
        r, c = divmod(i, grid)
        bits = max(1, (grid - 1).bit_length())
        return int("".join(f"{r:0{bits}b}"[b] + f"{c:0{bits}b}"[b] for b in range(bits)), 2)
    return sorted(range(grid * grid), key=code)


GRIDS = {8: 112, 5: 70, 9: 126}  # patches per side -> crop (14 px patches); 5 and 9: grid - 1 is a power of two


@settings(max_examples=examples(90), deadline=None)
@given(hw=st.sampled_from(IMAGE_SIZES), k=st.integers(1, 405), grid=st.sampled_from(sorted(GRIDS)))
def test_uniform_is_an_even_stride_along_the_z_curve(hw, k, grid):
    """Each partition gets its largest-remainder share of min(K, real) by real patches; along the Z-order curve
    through its real patches the picks sit b of n apart evenly: gaps differ by at most one."""
    crop = GRIDS[grid]
    layout = compute_layout(hw, [[crop, 2 * crop], [2 * crop, crop], [2 * crop, 2 * crop]], crop, grid, 5, 0)
    _check_uniform(layout, k, grid)


def test_uniform_gives_a_lone_real_patch_its_share():
    """A partition with exactly one real patch and a share of one keeps it (b / n = 1 / 1)."""
    from types import SimpleNamespace

    valid = np.zeros((5, 64), np.float32)
    valid[0] = 1.0
    valid[1, 37] = 1.0
    layout = SimpleNamespace(patch_valid=valid, feeds=lambda: {})
    assert [len(c) for c in _check_uniform(layout, 65, 8)] == [64, 1, 0, 0, 0]


def _check_uniform(layout, k: int, grid: int) -> list[set[int]]:
    n_part, n = layout.patch_valid.shape
    scores = distinct_scores(np.random.default_rng(0), layout.patch_valid.shape)
    sel = get_strategy("uniform").fn(inputs_for(layout, scores, scores), params(k, grid=grid))
    counts = [int(v.sum()) for v in layout.patch_valid]
    budgets = hamilton(counts, min(k, sum(counts)))
    chosen = chosen_sets(sel.priority, n_part, n)
    order = morton_order(grid)
    for p in range(n_part):
        assert len(chosen[p]) == budgets[p]
        curve = [i for i in order if layout.patch_valid[p, i] > 0]  # real patches along the curve
        picked = [j for j, i in enumerate(curve) if i in chosen[p]]
        if budgets[p] == 0:
            continue
        n = len(curve)
        gaps = np.diff(picked + [picked[0] + n])  # cyclic gaps between consecutive picks
        assert gaps.max() - gaps.min() <= 1, (p, picked)
        assert picked[-1] == n - 1  # floor((j + 1) b / n) steps up at the curve's end
    _check_bands(sel.priority, layout.patch_valid, scores)
    return chosen


def test_morton_order_of_a_4x4_grid():
    assert morton_order(4) == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]


@settings(max_examples=examples(40), deadline=None)
@given(hw=st.sampled_from(IMAGE_SIZES), k=st.integers(5, 320), contextual=st.sampled_from([0.125, 0.25, 0.375, 0.5]),
       seed=st.integers(0, 2**32 - 1))
def test_visionzip_dominant_targets_and_merge(hw, k, contextual, seed):
    """Per partition (share b of min(K, real) by real patches): the b - round(b c) best real patches are dominant;
    round(b c) targets are spread over the rest; every other real patch joins the target with the most similar key
    (cosine), and each target's feature becomes target + mean of its members."""
    rng = np.random.default_rng(seed)
    layout = layout_of(hw)
    p_n = layout.patch_valid.shape
    scores = distinct_scores(rng, p_n)
    feats = rng.standard_normal(p_n + (4,)).astype(np.float32)
    keys = rng.standard_normal(p_n + (6,)).astype(np.float32)
    sel = get_strategy("visionzip").fn(inputs_for(layout, scores, scores, feats, keys), params(k, contextual=contextual))
    counts = [int(v.sum()) for v in layout.patch_valid]
    budgets = hamilton(counts, min(k, sum(counts)))
    chosen = chosen_sets(sel.priority, 5, 64)
    assert tuple(sel.features.shape) == (p_n[0] * p_n[1], 4)  # [P*N, D], N != D here
    out = sel.features.numpy().reshape(p_n + (4,))
    for p in range(5):
        real = [i for i in range(64) if layout.patch_valid[p, i] > 0]
        b = budgets[p]
        ctx = int(Fraction(b) * Fraction(str(contextual)) + Fraction(1, 2))  # round half up
        dominant = set(top_indices(scores[p].tolist(), b - ctx, among=real))
        targets = chosen[p] - dominant
        assert dominant <= chosen[p] and len(chosen[p]) == b and len(targets) == min(ctx, len(real) - len(dominant))
        rest = [i for i in real if i not in dominant]
        if targets:
            step = max(len(rest) // ctx, 1)
            assert targets == {rest[j] for j in range(0, len(rest), step)[:ctx]}
        unit = keys[p] / np.linalg.norm(keys[p], axis=-1, keepdims=True)
        members = {t: [] for t in targets}
        for i in rest:
            if i not in targets and targets:
                best = max(targets, key=lambda t: float(unit[i] @ unit[t]))
                members[best].append(i)
        for i in range(64):
            expected = feats[p, i] + (np.mean(feats[p, members[i]], axis=0) if members.get(i) else 0.0)
            np.testing.assert_allclose(out[p, i], expected, atol=1e-5, err_msg=f"partition {p} patch {i}")
    _check_bands(sel.priority, layout.patch_valid, scores)


# --- the building blocks --------------------------------------------------------------------------


@settings(max_examples=examples(200), deadline=None)
@given(weights=st.lists(st.integers(0, 60), min_size=1, max_size=8), total=st.integers(0, 400))
@example(weights=[1, 0, 0], total=5)  # one unit weight: everything to it
@example(weights=[0, 0, 0], total=3)  # no weight: nothing to anyone
@example(weights=[21, 60, 60, 60, 7], total=104)  # remainders .5 and .5: the lower index wins
def test_largest_remainder_is_hamiltons_method(weights, total):
    got = largest_remainder(torch.tensor(weights, dtype=torch.float32), float(total))
    assert got.tolist() == [float(s) for s in hamilton(weights, total)]


@settings(max_examples=examples(200), deadline=None)
@given(rows=st.lists(st.lists(st.integers(0, 5), min_size=6, max_size=6), min_size=1, max_size=3),
       seed=st.integers(0, 2**32 - 1))
def test_rank_within_counts_better_eligible_entries(rows, seed):
    """rank = number of eligible entries of the row that score higher, or equal with a lower index."""
    scores = np.array(rows, np.float32)  # small integers: many ties
    eligible = (np.random.default_rng(seed).random(scores.shape) < 0.6).astype(np.float32)
    got = rank_within(torch.from_numpy(scores), torch.from_numpy(eligible)).numpy()
    for r in range(scores.shape[0]):
        for i in range(scores.shape[1]):
            better = sum(1 for j in range(scores.shape[1]) if eligible[r, j]
                         and (scores[r, j] > scores[r, i] or (scores[r, j] == scores[r, i] and j < i)))
            assert got[r, i] == better


@settings(max_examples=examples(40), deadline=None)
@given(hw=st.sampled_from(IMAGE_SIZES), k=st.integers(1, 320), seed=st.integers(0, 2**31 - 1))
def test_random_draws_k_real_patches_from_the_seeded_generator(hw, k, seed):
    """The K real patches with the largest draws of numpy's default_rng(seed) (one f32 draw per patch, [P, N]):
    a fixed, seeded choice that never touches padding."""
    layout = layout_of(hw)
    scores = distinct_scores(np.random.default_rng(0), layout.patch_valid.shape)
    sel = get_strategy("random").fn(inputs_for(layout, scores, scores), SelectionParams(
        k=k, budget=k / 320, alpha=0.5, contextual=0.15, seed=seed, heads=HEADS, patch_grid=8))
    draw = np.random.default_rng(seed).random((5, 64), dtype=np.float32).reshape(-1)
    real = np.flatnonzero(layout.patch_valid.reshape(-1) > 0).tolist()
    expected = set(top_indices(draw.tolist(), min(k, len(real)), among=real))
    assert set(torch.topk(sel.priority, min(k, len(real))).indices.tolist()) == expected
    assert torch.all(sel.priority.reshape(5, 64)[torch.from_numpy(layout.patch_valid) == 0] == 0)
