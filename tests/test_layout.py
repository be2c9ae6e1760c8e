"""`compute_layout` (runtime, numpy) against transformers' own anyres arithmetic.

Two references: the processor's token count (`_get_number_of_features`, which decides how many
`<image>` tokens the prompt gets) and the model's `pack_image_features` + `unpad_image` (which
decides the order of the packed features). Fed a feature tensor whose value is the flat patch
index, `pack_image_features` tells exactly which (partition, row, col) it keeps and in what order.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from edgeprune.models.llava_next import LLAVA_16_PINPOINTS, TINY_IMAGE, TINY_PINPOINTS, _twin_processor
from edgeprune_runtime.layout import (
    INVALID_KEY,
    compute_layout,
    max_newline_rows,
    max_partitions,
    select_best_resolution,
)

NEWLINE = -1.0  # the value our fake image_newline carries through pack_image_features

EDGES = [1, 2, 13, 50, 111, 112, 113, 200, 224, 225, 337, 500]
TINY_SIZES = sorted(set(itertools.product(EDGES, EDGES)) | {(1, 500), (500, 1), (1, 1), (60, 200), (300, 90)})
LLAVA16_SIZES = sorted(set(itertools.product([1, 40, 335, 336, 337, 480, 640, 672, 1008, 1500], repeat=2))
                       | {(1, 2000), (2000, 1), (720, 1280), (1080, 1920), (3000, 400)})

GEOMETRIES = {
    "tiny": (TINY_IMAGE, TINY_PINPOINTS, TINY_SIZES),
    "llava-1.6": (336, LLAVA_16_PINPOINTS, LLAVA16_SIZES),
}


@pytest.fixture(scope="module", params=sorted(GEOMETRIES))
def geometry(request):
    """A processor and a stand-in `self` for LlavaNextModel.pack_image_features (it only reads config)."""
    crop, pinpoints, sizes = GEOMETRIES[request.param]
    processor = _twin_processor(crop, pinpoints)
    config = SimpleNamespace(vision_config=SimpleNamespace(image_size=crop, patch_size=14),
                             image_grid_pinpoints=pinpoints)
    g = crop // 14
    return SimpleNamespace(name=request.param, crop=crop, pinpoints=pinpoints, sizes=sizes, processor=processor,
                           model_self=SimpleNamespace(config=config), grid=g,
                           partitions=max_partitions(pinpoints, crop), rows=max_newline_rows(pinpoints, crop, g))


def _layout(geo, hw):
    return compute_layout(hw, geo.pinpoints, geo.crop, geo.grid, geo.partitions, geo.rows)


def _hf_packed_order(geo, hw) -> list[float]:
    """transformers' packed sequence for image `hw`: flat patch index p*N + n, or NEWLINE."""
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

    n = geo.grid * geo.grid
    parts = image_size_to_num_patches(list(hw), geo.pinpoints, geo.crop)
    features = torch.arange(parts * n, dtype=torch.float64).reshape(parts, n, 1)
    newline = torch.tensor([NEWLINE], dtype=torch.float64)
    packed, lens = LlavaNextModel.pack_image_features(geo.model_self, [features], torch.tensor([hw]), "default",
                                                      image_newline=newline)
    assert int(lens[0]) == packed[0].shape[0]
    return packed[0][:, 0].tolist()


def _our_order(layout) -> list[float]:
    """Our sequence: valid patches and valid newlines sorted by their order keys."""
    flat_valid = layout.patch_valid.reshape(-1) > 0
    items = [(k, float(i)) for i, k in enumerate(layout.patch_key.reshape(-1)) if flat_valid[i]]
    items += [(k, NEWLINE) for k, v in zip(layout.newline_key, layout.newline_valid) if v > 0]
    keys = [k for k, _ in items]
    assert len(set(keys)) == len(keys), "two real tokens share an order key"
    return [value for _, value in sorted(items)]


def test_token_count_matches_processor(geometry):
    """valid patches + valid newlines == the number of <image> tokens the processor inserts."""
    mismatches = []
    for hw in geometry.sizes:
        layout = _layout(geometry, hw)
        ours = layout.num_patches + int(layout.newline_valid.sum())
        theirs = geometry.processor._get_number_of_features(hw[0], hw[1], geometry.crop, geometry.crop) - 1
        if ours != theirs:
            mismatches.append((hw, ours, theirs))
    assert not mismatches, f"(hw, ours, processor) differ: {mismatches[:10]}"


def test_order_matches_pack_image_features(geometry):
    """The kept (partition, row, col) and their sequence order equal transformers' packing, newlines included."""
    mismatches = []
    for hw in geometry.sizes:
        ours, theirs = _our_order(_layout(geometry, hw)), _hf_packed_order(geometry, hw)
        if ours != theirs:
            mismatches.append(hw)
    assert not mismatches, f"order differs from pack_image_features for sizes {mismatches[:10]}"


def test_keys_are_sequence_positions(geometry):
    """Real keys are exactly 0..L-1 (positions in the packed image sequence); padding has INVALID_KEY."""
    for hw in geometry.sizes:
        layout = _layout(geometry, hw)
        valid = layout.patch_valid > 0
        keys = np.concatenate([layout.patch_key[valid], layout.newline_key[layout.newline_valid > 0]])
        np.testing.assert_array_equal(np.sort(keys), np.arange(len(keys), dtype=np.float32), err_msg=str(hw))
        assert np.all(layout.patch_key[~valid] == INVALID_KEY)
        assert np.all(layout.newline_key[layout.newline_valid == 0] == INVALID_KEY)
        assert np.all(layout.patch_valid[0] == 1), "the base image is always fully real"


def test_patch_row_is_stitched_row(geometry):
    """patch_row of a crop patch == the number of newlines before it in transformers' sequence; -1 elsewhere."""
    n = geometry.grid * geometry.grid
    for hw in geometry.sizes:
        layout = _layout(geometry, hw)
        row_of = {}
        newlines = 0
        for value in _hf_packed_order(geometry, hw):
            if value == NEWLINE:
                newlines += 1
            elif value >= n:  # a crop patch (the base image comes first and has no newlines)
                row_of[int(value)] = newlines
        rows = layout.patch_row.reshape(-1)
        expected = np.full_like(rows, -1.0)
        for index, r in row_of.items():
            expected[index] = r
        np.testing.assert_array_equal(rows, expected, err_msg=str(hw))


def test_grid_and_partitions_match_transformers(geometry):
    from transformers.image_processing_utils import select_best_resolution as hf_select
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    for hw in geometry.sizes:
        layout = _layout(geometry, hw)
        assert select_best_resolution(hw, geometry.pinpoints) == tuple(hf_select(hw, geometry.pinpoints))
        rows, cols = layout.grid
        assert 1 + rows * cols == image_size_to_num_patches(list(hw), geometry.pinpoints, geometry.crop)
        assert 1 + rows * cols <= geometry.partitions
        assert layout.patch_valid[1 + rows * cols:].sum() == 0, "partitions past the crop grid must be padding"


def test_processor_accepts_extreme_aspect_images(geometry):
    """1-pixel-wide/high images go through the processor and get exactly our token count."""
    from PIL import Image

    for hw in [(1, 1), (1, 500), (500, 1)]:
        image = Image.new("RGB", (hw[1], hw[0]), (200, 10, 10))
        out = geometry.processor(images=image, text="<image>", return_tensors="np")
        tokens = int((out["input_ids"][0] == geometry.processor.tokenizer.convert_tokens_to_ids("<image>")).sum())
        layout = _layout(geometry, hw)
        assert tokens == layout.num_patches + int(layout.newline_valid.sum()), hw


def test_static_sizes():
    assert max_partitions(TINY_PINPOINTS, 112) == 5
    assert max_newline_rows(TINY_PINPOINTS, 112, 8) == 16
    assert max_partitions(LLAVA_16_PINPOINTS, 336) == 5  # 2x2 is the largest grid
    assert max_newline_rows(LLAVA_16_PINPOINTS, 336, 24) == 72  # 1008x336: three crops stacked


def test_too_few_partitions_is_an_error():
    with pytest.raises(ValueError, match="2x2 needs 5 partitions"):
        compute_layout((224, 224), TINY_PINPOINTS, 112, 8, partitions=3, newline_rows=16)
