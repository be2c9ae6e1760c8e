"""The anyres layout (runtime/edgeprune_runtime/layout.py) against transformers' own packing.

For any image size, the real patches ordered by `patch_key` and the newline slots ordered by
`newline_key` must be exactly the sequence transformers' `pack_image_features` builds
(tests/hf_packing.py runs it on features that carry their own identity). `base_region` must name,
for each base-image patch, the crop whose part of the unpadded grid holds the patch's centre.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from example_counts import examples

from edgeprune_runtime.layout import INVALID_KEY, compute_layout, max_newline_rows, max_partitions
from hf_packing import packed_order, unpadded_grid

TINY = ([[112, 224], [224, 112], [224, 224]], 112, 14)
LLAVA16 = ([[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], 336, 14)


def layout_sequence(layout, n: int) -> list[tuple]:
    """The same sequence, read off the layout: real patches by key, newline slots by key."""
    items = []
    for p, i in zip(*np.nonzero(layout.patch_valid)):
        items.append((float(layout.patch_key[p, i]), ("patch", int(p), int(i))))
    for r in np.flatnonzero(layout.newline_valid):
        items.append((float(layout.newline_key[r]), ("newline", int(r))))
    keys = [k for k, _ in items]
    assert len(set(keys)) == len(keys), "two tokens share a sequence position"
    return [it for _, it in sorted(items)]


def check(hw, pinpoints, crop, patch):
    g = crop // patch
    n = g * g
    parts, rows = max_partitions(pinpoints, crop), max_newline_rows(pinpoints, crop, g)
    layout = compute_layout(hw, pinpoints, crop, g, parts, rows)
    expected = packed_order(hw, pinpoints, crop, patch)
    assert layout_sequence(layout, n) == expected
    # padding: invalid everywhere, and its key sorts after every real token
    assert np.all(layout.patch_key[layout.patch_valid == 0] == INVALID_KEY)
    assert np.all(layout.newline_key[layout.newline_valid == 0] == INVALID_KEY)
    assert layout.patch_key[0].tolist() == list(range(n))  # the base image comes first, raster order
    real_parts = 1 + layout.grid[0] * layout.grid[1]
    assert layout.partition_real.tolist() == [1.0] * real_parts + [0.0] * (parts - real_parts)
    grid = unpadded_grid(expected)
    if not grid or not grid[0]:  # an extreme aspect ratio leaves no crop patch after unpadding (8 x 129: 1x2 grid)
        assert 0 in layout.unpadded and layout.patch_valid[1:].sum() == 0
        return layout
    assert layout.unpadded == (len(grid), len(grid[0]))
    # stitched row of each real crop patch = the row of the unpadded grid it sits in
    for r, row in enumerate(grid):
        for p, i in row:
            assert layout.patch_row[p, i] == r
    assert np.all(layout.patch_row[0] == -1) and np.all(layout.patch_row[layout.patch_valid == 0] == -1)
    # base_region: the crop holding the base patch's centre, mapped onto the unpadded grid
    uh, uw = layout.unpadded
    for i in range(n):
        cy, cx = int((i // g + 0.5) / g * uh), int((i % g + 0.5) / g * uw)
        assert layout.base_region[i] == grid[cy][cx][0], (hw, i)
    return layout


@pytest.mark.parametrize("hw", [(224, 224), (100, 220), (220, 100), (60, 200), (300, 90), (180, 150), (113, 112)])
def test_tiny_layouts_match_transformers(hw):
    check(hw, *TINY)


@pytest.mark.parametrize("hw", [(480, 640), (672, 672), (1000, 330), (330, 1000), (500, 700), (337, 1009)])
def test_llava16_layouts_match_transformers(hw):
    check(hw, *LLAVA16)


@settings(max_examples=examples(120), deadline=None)
@given(h=st.integers(8, 1500), w=st.integers(8, 1500), llava16=st.booleans())
def test_any_image_size_matches_transformers(h, w, llava16):
    check((h, w), *(LLAVA16 if llava16 else TINY))


def test_a_wide_image_on_the_tiny_grid_by_hand():
    """60 x 200 (h x w): best pinpoint 112 x 224 -> a 1x2 crop grid, 8 x 16 stitched patches; the image fills
    round(60 * 16 / 200, 7) = 4.8 -> 4 rows, padding (8 - 4) // 2 = 2 rows above: rows 2..5 are real."""
    layout = compute_layout((60, 200), *TINY[:2], 8, 5, 16)
    assert layout.grid == (1, 2) and layout.unpadded == (4, 16)
    assert layout.patch_valid[1].reshape(8, 8).sum(axis=1).tolist() == [0, 0, 8, 8, 8, 8, 0, 0]
    assert layout.patch_valid[3:].sum() == 0 and layout.newline_valid.tolist() == [1.0] * 4 + [0.0] * 12
    assert layout.patch_key[1, 16] == 64 and layout.patch_key[2, 16] == 64 + 8  # row 0: crop 1 then crop 2
    assert layout.newline_key[0] == 64 + 16 and layout.patch_key[1, 24] == 64 + 17
    assert layout.base_region.reshape(8, 8)[:, :4].tolist() == [[1.0] * 4] * 8
    assert layout.base_region.reshape(8, 8)[:, 4:].tolist() == [[2.0] * 4] * 8


def test_too_few_partitions_is_refused():
    with pytest.raises(ValueError, match=r"crop grid 2x2 needs 5 partitions, bundle has 3"):
        compute_layout((224, 224), *TINY[:2], 8, 3, 16)
