"""The layout arrays as the vision graphs consume them: names, dtypes, padding keys, and the released
HiRED packing checked against the released code's own stitch + unpad (tests/hired_reference_impl.py).

tests/test_layout.py checks the transformers packing; these check what the mutation run found
unchecked: which feeds exist, that they are float32 (ONNX Runtime refuses float64 for the graphs'
f32 inputs), that padding sorts after every real token, and the released packing for every image
size rather than the few images the end-to-end hired-reference test runs.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from edgeprune.graphs import BASE_INPUTS, NEWLINE_INPUTS
from edgeprune.models.llava_next import LLAVA_16_PINPOINTS, TINY_IMAGE, TINY_PINPOINTS
from edgeprune.strategies import SPECS
from edgeprune_runtime.layout import INVALID_KEY, compute_layout, max_newline_rows, max_partitions
from tests.hired_reference_impl import _select_best_resolution as reference_best_resolution
from tests.hired_reference_impl import released_packing

EDGES = [1, 2, 13, 50, 111, 112, 113, 200, 224, 225, 337, 500]
CASES = [("tiny", TINY_IMAGE, TINY_PINPOINTS, hw) for hw in itertools.product(EDGES, EDGES)] + \
        [("llava-1.6", 336, LLAVA_16_PINPOINTS, hw) for hw in
         itertools.product([1, 40, 335, 337, 480, 641, 672, 1007, 1500], repeat=2)]


def _layout(crop, pinpoints, hw):
    g = crop // 14
    return compute_layout(hw, pinpoints, crop, g, max_partitions(pinpoints, crop), max_newline_rows(pinpoints, crop, g))


@pytest.mark.parametrize("name,crop,pinpoints,hw", CASES[::7] + CASES[-3:], ids=lambda v: str(v))
def test_every_layout_input_a_vision_graph_declares_is_fed_as_float32(name, crop, pinpoints, hw):
    """The exporter's input names (graphs.BASE_INPUTS, NEWLINE_INPUTS, each strategy's layout_inputs) are
    exactly the layout's feeds, each float32 with the static shape the manifest documents."""
    layout = _layout(crop, pinpoints, hw)
    g = crop // 14
    p, n, r = max_partitions(pinpoints, crop), g * g, max_newline_rows(pinpoints, crop, g)
    declared = set(BASE_INPUTS[1:]) | set(NEWLINE_INPUTS) | {i for s in SPECS.values() for i in s.layout_inputs}
    feeds = layout.feeds()
    assert set(feeds) == declared
    shapes = {"patch_valid": (p, n), "patch_key": (p, n), "patch_row": (p, n), "newline_key": (r,),
              "newline_valid": (r,), "partition_real": (p,), "base_region": (n,), "released_valid": (p, n),
              "released_key": (p, n)}
    for key, value in feeds.items():
        assert value.dtype == np.float32 and value.shape == shapes[key], key


@pytest.mark.parametrize("name,crop,pinpoints,hw", CASES, ids=lambda v: str(v))
def test_masks_are_0_or_1_and_padding_keys_sort_after_every_real_token(name, crop, pinpoints, hw):
    layout = _layout(crop, pinpoints, hw)
    for valid, key in ((layout.patch_valid, layout.patch_key), (layout.released_valid, layout.released_key),
                       (layout.newline_valid, layout.newline_key)):
        assert set(np.unique(valid).tolist()) <= {0.0, 1.0}  # masks multiply features: 1 means "real", nothing else
        assert np.all(key[valid == 0] == INVALID_KEY)
        assert np.all(key[valid > 0] < INVALID_KEY)


@pytest.mark.parametrize("name,crop,pinpoints,hw", CASES, ids=lambda v: str(v))
def test_released_packing_matches_the_released_code(name, crop, pinpoints, hw):
    """Every patch kept (mask all true): the released code's packing order, (partition, row, col), equals
    our released_valid patches sorted by released_key, and the keys are the positions 0, 1, 2, ..."""
    layout = _layout(crop, pinpoints, hw)
    g = crop // 14
    bh, bw = reference_best_resolution(hw, pinpoints)  # the released code's own choice of crop grid
    rows, cols = bh // crop, bw // crop
    mask = torch.ones(1 + rows * cols, g * g, dtype=torch.bool)
    expected = released_packing(mask, rows, cols, g, hw)
    p_idx, n_idx = np.nonzero(layout.released_valid > 0)
    keys = layout.released_key[p_idx, n_idx]
    order = np.argsort(keys, kind="stable")
    ours = [(int(p_idx[i]), int(n_idx[i]) // g, int(n_idx[i]) % g) for i in order]
    assert ours == expected
    assert keys[order].tolist() == list(range(len(expected)))


def test_static_sizes_are_ints():
    """They become graph shapes and manifest integers."""
    for pinpoints, crop in ((TINY_PINPOINTS, TINY_IMAGE), (LLAVA_16_PINPOINTS, 336)):
        assert type(max_newline_rows(pinpoints, crop, crop // 14)) is int
        assert type(max_partitions(pinpoints, crop)) is int


@pytest.mark.parametrize("hw", [(50, 500), (225, 113), (1, 1)])
def test_layout_for_reads_a_bundles_static_sizes(hw):
    """The runtime's entry point: the sizes come from the manifest's Shapes by name (distinct values, so a
    swapped or wrong field changes the arrays or raises)."""
    from types import SimpleNamespace

    from edgeprune_runtime.layout import layout_for

    shapes = SimpleNamespace(crop_size=TINY_IMAGE, patch_grid=TINY_IMAGE // 14, partitions=6, newline_slots=17)
    got = layout_for(hw, TINY_PINPOINTS, shapes)
    want = compute_layout(hw, TINY_PINPOINTS, TINY_IMAGE, TINY_IMAGE // 14, 6, 17)
    assert got.grid == want.grid and got.unpadded == want.unpadded
    for key, value in want.feeds().items():
        assert np.array_equal(got.feeds()[key], value), key
    assert got.patch_valid.shape == (6, (TINY_IMAGE // 14) ** 2) and got.newline_valid.shape == (17,)
