"""Anyres layout: which partitions, patches and newline slots of the static vision input are real.

LLaVA-NeXT picks a crop grid per image, unpads the stitched crop features to the image's
aspect ratio and appends an `image_newline` after every stitched row. Our graphs always take
the maximum number of partitions; this module computes, in plain Python/numpy and with the
exact arithmetic of `transformers` (`select_best_resolution`, `unpad_image`), the masks and
order keys that tell the vision graph what is real and where each token goes in the sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INVALID_KEY = 1.0e7  # order key of padding: sorts after every real token (keys stay < 2**24, exact in f32)


def select_best_resolution(original_size: tuple[int, int], possible_resolutions) -> tuple[int, int]:
    """(height, width) of the grid pinpoint that keeps most of the image and wastes least (as transformers)."""
    original_height, original_width = original_size
    best_fit = None
    max_effective, min_wasted = 0, float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        down_w, down_h = int(original_width * scale), int(original_height * scale)
        effective = min(down_w * down_h, original_width * original_height)
        wasted = (width * height) - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted = effective, wasted
            best_fit = (height, width)
    return best_fit


def unpad_bounds(original_size: tuple[int, int], current: tuple[int, int]) -> tuple[int, int, int, int]:
    """(row_lo, row_hi, col_lo, col_hi) kept by transformers' `unpad_image` on a [current_h, current_w] grid."""
    original_height, original_width = original_size
    current_height, current_width = current
    if original_width / original_height > current_width / current_height:
        scale = current_width / original_width
        new_height = int(round(original_height * scale, 7))
        padding = (current_height - new_height) // 2
        return padding, current_height - padding, 0, current_width
    scale = current_height / original_height
    new_width = int(round(original_width * scale, 7))
    padding = (current_width - new_width) // 2
    return 0, current_height, padding, current_width - padding


def max_newline_rows(pinpoints, crop_size: int, patch_grid: int) -> int:
    """R: the most stitched patch rows any crop grid can have (one newline slot each)."""
    return max(h // crop_size for h, _ in pinpoints) * patch_grid


def max_partitions(pinpoints, crop_size: int) -> int:
    """P: base image + the largest crop grid."""
    return 1 + max((h // crop_size) * (w // crop_size) for h, w in pinpoints)


def released_hired_unpad_bounds(image_hw: tuple[int, int], current: tuple[int, int]) -> tuple[int, int, int, int]:
    """`unpad_image` as released with HiRED (older transformers): int() truncation, and the arithmetic
    of 0-d int64 tensors, whose true division is float32. Bounds as (row_lo, row_hi, col_lo, col_hi)."""
    f32 = np.float32
    oh, ow = image_hw
    cur_h, cur_w = current
    if f32(ow) / f32(oh) > f32(cur_w / cur_h):
        new_h = int(f32(oh) * (f32(cur_w) / f32(ow)))
        pad = (cur_h - new_h) // 2
        return pad, cur_h - pad, 0, cur_w
    new_w = int(f32(ow) * (f32(cur_h) / f32(oh)))
    pad = (cur_w - new_w) // 2
    return 0, cur_h, pad, cur_w - pad


@dataclass(frozen=True)
class Layout:
    grid: tuple[int, int]  # crop grid (rows, cols)
    unpadded: tuple[int, int]  # stitched patch grid after unpadding (rows, cols)
    patch_valid: np.ndarray  # f32 [P, N]  1 = real patch
    patch_key: np.ndarray  # f32 [P, N]  position in transformers' packed image sequence
    patch_row: np.ndarray  # f32 [P, N]  stitched row of a real crop patch, -1 for base/padding
    newline_key: np.ndarray  # f32 [R]
    newline_valid: np.ndarray  # f32 [R]  1 for the rows that exist after unpadding
    partition_real: np.ndarray  # f32 [P]  1 for the base image and the crops of this image's grid
    base_region: np.ndarray  # f32 [N]  crop partition (1..P-1) whose image region holds each base patch
    released_valid: np.ndarray  # f32 [P, N]  patches the released HiRED packing keeps (its quirky unpad)
    released_key: np.ndarray  # f32 [P, N]  their order in the released HiRED packing

    @property
    def num_patches(self) -> int:
        return int(self.patch_valid.sum())

    def feeds(self) -> dict[str, np.ndarray]:
        """Every layout input a vision graph may declare; a runtime feeds only the declared ones."""
        return {
            "patch_valid": self.patch_valid,
            "patch_key": self.patch_key,
            "patch_row": self.patch_row,
            "newline_key": self.newline_key,
            "newline_valid": self.newline_valid,
            "partition_real": self.partition_real,
            "base_region": self.base_region,
            "released_valid": self.released_valid,
            "released_key": self.released_key,
        }


def compute_layout(image_hw: tuple[int, int], pinpoints, crop_size: int, patch_grid: int,
                   partitions: int, newline_rows: int) -> Layout:
    """Masks and order keys for an image of `image_hw` = (height, width) pixels.

    Sequence order (transformers' `pack_image_features`): the base image's N patches in raster
    order, then the unpadded stitched crop grid row by row, each row followed by a newline.
    """
    g, n = patch_grid, patch_grid * patch_grid
    best_h, best_w = select_best_resolution(image_hw, pinpoints)
    rows, cols = best_h // crop_size, best_w // crop_size
    if 1 + rows * cols > partitions:
        raise ValueError(f"crop grid {rows}x{cols} needs {1 + rows * cols} partitions, bundle has {partitions}")
    r_lo, r_hi, c_lo, c_hi = unpad_bounds(image_hw, (rows * g, cols * g))
    uh, uw = r_hi - r_lo, c_hi - c_lo
    stride = uw + 1  # newline at the end of each stitched row

    valid = np.zeros((partitions, n), np.float32)
    key = np.full((partitions, n), INVALID_KEY, np.float32)
    row = np.full((partitions, n), -1.0, np.float32)
    valid[0] = 1.0
    key[0] = np.arange(n, dtype=np.float32)
    ii, jj = np.divmod(np.arange(n), g)  # patch row/col inside a partition
    for a in range(rows):
        for b in range(cols):
            p = 1 + a * cols + b  # processor order: row-major crops after the base image
            sr, sc = a * g + ii, b * g + jj  # stitched coordinates
            real = (sr >= r_lo) & (sr < r_hi) & (sc >= c_lo) & (sc < c_hi)
            valid[p] = real
            key[p] = np.where(real, n + (sr - r_lo) * stride + (sc - c_lo), INVALID_KEY)
            row[p] = np.where(real, sr - r_lo, -1)
    r = np.arange(newline_rows)
    newline_valid = (r < uh).astype(np.float32)
    newline_key = np.where(r < uh, n + r * stride + uw, INVALID_KEY).astype(np.float32)

    partition_real = np.zeros(partitions, np.float32)
    partition_real[: 1 + rows * cols] = 1.0
    # The base image is the whole image squashed to one crop; the crops tile the unpadded canvas.
    # A base patch's centre, mapped onto the canvas, falls into one crop: the crop it "previews".
    sy = r_lo + (ii + 0.5) / g * uh  # [N] stitched row coordinate (patch units)
    sx = c_lo + (jj + 0.5) / g * uw
    a = np.clip(np.floor(sy / g), 0, rows - 1)
    b = np.clip(np.floor(sx / g), 0, cols - 1)
    base_region = (1 + a * cols + b).astype(np.float32)

    released_valid, released_key = _released_packing(image_hw, rows, cols, g, partitions)
    return Layout((rows, cols), (uh, uw), valid, key, row, newline_key, newline_valid,
                  partition_real, base_region, released_valid, released_key)


def layout_for(image_hw: tuple[int, int], pinpoints, shapes) -> Layout:
    """`compute_layout` with the static sizes of a bundle's `Shapes`."""
    return compute_layout(image_hw, pinpoints, shapes.crop_size, shapes.patch_grid, shapes.partitions,
                          shapes.newline_slots)


def _released_packing(image_hw, rows: int, cols: int, g: int, partitions: int):
    """Which patches survive, and in which order, in released HiRED's `pack_HiRED_image_features`.

    Its crops are stitched with rows and cols swapped (crop k at block (k // rows, k % rows) of a
    [cols*g, rows*g] grid; only non-square grids are affected), then cut by the old `unpad_image`;
    the base image's patches come first in raster order, the survivors follow row-major.
    """
    n = g * g
    valid = np.zeros((partitions, n), np.float32)
    key = np.full((partitions, n), INVALID_KEY, np.float32)
    valid[0], key[0] = 1.0, np.arange(n, dtype=np.float32)
    grid_h, grid_w = cols * g, rows * g
    r_lo, r_hi, c_lo, c_hi = released_hired_unpad_bounds(image_hw, (grid_h, grid_w))
    width = c_hi - c_lo
    ii, jj = np.divmod(np.arange(n), g)
    for k in range(rows * cols):
        gy, gx = (k // rows) * g + ii, (k % rows) * g + jj  # the swapped stitch
        real = (gy >= r_lo) & (gy < r_hi) & (gx >= c_lo) & (gx < c_hi)
        valid[1 + k] = real
        key[1 + k] = np.where(real, n + (gy - r_lo) * width + (gx - c_lo), INVALID_KEY)
    return valid, key
