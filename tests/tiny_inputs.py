"""Deterministic synthetic inputs shared by the test modules (import as `from tiny_inputs import ...`)."""

from __future__ import annotations

import numpy as np


def random_image(hw: tuple[int, int], seed: int = 0):
    """A PIL RGB image of (height, width) with seeded uniform noise; the same call gives the same pixels."""
    from PIL import Image

    rng = np.random.default_rng(seed + 7919 * hw[0] + hw[1])
    return Image.fromarray(rng.integers(0, 256, size=(hw[0], hw[1], 3), dtype=np.uint8))
