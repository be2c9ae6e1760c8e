"""The memory budget: what a bundle's static sizes (and a request's image) make the runtime allocate, checked
against a limit before anything is allocated.

    EDGEPRUNE_MEMORY_BUDGET_MB    the budget in MiB (or `memory_budget_mb` of Bundle_Create); default
                                  min(8 GiB, physical memory)
    EDGEPRUNE_MAX_IMAGE_PIXELS    the largest image (width x height) decoded (or `max_image_pixels`);
                                  default 100 million, above any camera a robot carries

Counted, per request: the decoded image and its conversions, the preprocessing canvases, pixel values,
layout masks, the vision and prefill outputs, the whole KV cache (its pages are touched only as slots fill,
but a bundle may fill them all), the decode buffers and the sampler's work arrays. Not counted: the graph
weights (files of the bundle, mapped or loaded by ONNX Runtime: their size is the bundle's size on disk)
and the intermediate tensors ONNX Runtime allocates inside a graph (a graph is code; see the README's
threat model).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from edgeprune_runtime import checks
from edgeprune_runtime.env import env_int
from edgeprune_runtime.errors import RuntimeStatusError, Status

MIB = 1 << 20
DEFAULT_BUDGET_MB = 8192
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# Peak bytes of decoding and preprocessing a width x height image (load_image + preprocess), measured as peak
# RSS growth on PNGs: ~4 per pixel for RGB, 11 for 16-bit grey, 17 for a palette with transparency, 20 for
# RGBA (compositing onto white holds three RGBA images); Pillow adds a row pointer per row per image copy
# and each resize ~16 bytes of coefficients per source row or column, which dominates for 1-pixel-wide or
# -high images (36-60 bytes per pixel). tests/runtime/test_trust.py checks these bounds on such shapes.
IMAGE_BYTES_PER_PIXEL = 24
IMAGE_BYTES_PER_ROW = 88
IMAGE_BYTES_PER_COLUMN = 40


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not POSIX, or the value is unknown
        return None


@dataclass(frozen=True)
class Limits:
    memory_bytes: int  # the budget of one request's buffers (see module docstring)
    image_pixels: int  # width x height of the largest image decoded


def _option(value, env_name: str, default: int, what: str) -> int:
    if value is None:
        return env_int(env_name, default, minimum=1)
    if type(value) is not int or value < 1:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"{what} must be an integer >= 1 or None, got {checks.show(value)}")
    return value


def limits(memory_budget_mb: int | None = None, max_image_pixels: int | None = None) -> Limits:
    """The limits of one bundle: the arguments when given, else the environment, else the defaults.

    Raises RuntimeStatusError(INVALID_ARGUMENT) for a value that is not an integer >= 1."""
    physical = _physical_memory()
    default_mb = min(DEFAULT_BUDGET_MB, physical // MIB) if physical else DEFAULT_BUDGET_MB
    mb = _option(memory_budget_mb, "EDGEPRUNE_MEMORY_BUDGET_MB", default_mb, "memory_budget_mb")
    pixels = _option(max_image_pixels, "EDGEPRUNE_MAX_IMAGE_PIXELS", DEFAULT_MAX_IMAGE_PIXELS, "max_image_pixels")
    return Limits(mb * MIB, pixels)


def request_bytes(shapes, pp, cache_itemsize: int) -> dict[str, int]:
    """Bytes the runtime allocates for one request of a bundle, by part, the image excluded (`image_bytes`).

    shapes: manifest.Shapes; pp: preprocess.PreprocessParams; cache_itemsize: 2 (fp16) or 4 (fp32).
    Exact Python integers: no size can overflow here, however large the manifest's numbers.
    """
    s = shapes
    P, crop, N, R, V, D = s.partitions, s.crop_size, s.patches_per_partition, s.newline_slots, s.visual_slots, s.hidden_size
    se = pp.shortest_edge
    kv_per_slot = 2 * sum(s.kv_heads) * s.head_dim  # key + value elements of one slot, all layers
    return {
        # anyres: the image resized to a pinpoint, then padded (uint8 RGB, both alive at once)
        "preprocess canvas": 2 * 3 * max(h * w for h, w in pp.image_grid_pinpoints),
        # every partition (and the base image) resized to shortest_edge x shortest_edge, uint8 RGB
        "preprocess partitions": P * 3 * se * se,
        # uint8 stack, float64 rescale, float32 cast, normalised, zero-padded pixel_values
        "pixel values": P * 3 * crop * crop * (1 + 8 + 4 + 4 + 4),
        # nine f32 [P, N] masks/keys plus temporaries, newline masks, int64 index vectors
        "layout": (12 * P * N + 2 * R + N) * 4 + 4 * N * 8,
        "vision outputs": V * D * 4 + V * 4 + V * 8,
        # layer l: K/V of its S_l slots (+ their validity when visual tokens were dropped before it)
        "prefill outputs": s.vocab_size * 4 + sum(s.prefill_slots_at(i) * (2 * h * s.head_dim + 1) * 4
                                                  for i, h in enumerate(s.kv_heads)),
        # layer l: K and V [Hkv_l, C_l, Dh] and its validity [C_l] f32
        "kv cache": sum(s.cache_slots_at(i) * (2 * h * s.head_dim * cache_itemsize + 4) for i, h in enumerate(s.kv_heads)),
        "decode buffers": s.vocab_size * 4 + kv_per_slot * cache_itemsize,
        "sampling": s.vocab_size * 8 * 4,  # float64 probabilities, sort order, cumulative sum, filtered copy
    }


def check_request(parts: dict[str, int], lim: Limits) -> int:
    """Raises RuntimeStatusError(RESOURCE_LIMIT) when the parts exceed the budget; returns their total."""
    total = sum(parts.values())
    if total > lim.memory_bytes:
        largest = max(parts, key=parts.get)
        need_mb = -(-total // MIB)
        raise RuntimeStatusError(
            Status.RESOURCE_LIMIT,
            f"the bundle needs {need_mb} MiB per request (largest part: {largest}, {-(-parts[largest] // MIB)} MiB), "
            f"over the memory budget of {lim.memory_bytes // MIB} MiB; if you trust this bundle, raise "
            f"EDGEPRUNE_MEMORY_BUDGET_MB to {need_mb} or more",
        )
    return total


def image_bytes(width: int, height: int) -> int:
    """Peak bytes of decoding a width x height image, converting it to RGB and preprocessing it."""
    return width * height * IMAGE_BYTES_PER_PIXEL + height * IMAGE_BYTES_PER_ROW + width * IMAGE_BYTES_PER_COLUMN
