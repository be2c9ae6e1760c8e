"""The fixed-size KV cache: per-layer numpy buffers written in place, plus a validity mask.

Layout (README "How it works"): layer l has K and V buffers [Hkv_l, C, Dh] (a list, since head
pruning may give layers different Hkv) and all layers share `valid` [C] (1 = slot holds a token).
Valid tokens are kept compacted in slots 0..length-1, so a slot index is also the token's
position (positions count valid slots), and the next token goes to slot `length`.
"""

from __future__ import annotations

import numpy as np

from edgeprune_runtime.errors import RuntimeStatusError, Status


def prefill_slot_valid(text_valid: np.ndarray, visual_valid: np.ndarray, slots_before: int) -> np.ndarray:
    """Validity [S] of the prefill sequence, in its order: text-before | visual | text-after."""
    return np.concatenate([text_valid[:slots_before], visual_valid, text_valid[slots_before:]]).astype(np.float32)


class KVCache:
    def __init__(self, kv_heads, capacity: int, head_dim: int, dtype=np.float32):
        self.capacity = int(capacity)
        # np.zeros maps zero pages lazily: only slots ever written cost memory
        self.keys = [np.zeros((h, capacity, head_dim), dtype) for h in kv_heads]  # [Hkv_l, C, Dh] each
        self.values = [np.zeros((h, capacity, head_dim), dtype) for h in kv_heads]
        self.valid = np.zeros(capacity, np.float32)  # [C]
        self.length = 0

    @property
    def full(self) -> bool:
        return self.length >= self.capacity

    def fill_from_prefill(self, keys, values, slot_valid: np.ndarray) -> int:
        """Copies the K/V of the valid prefill slots, compacted, into slots 0..n-1; returns n.

        keys/values: per layer [Hkv_l, S, Dh]; slot_valid [S] (see `prefill_slot_valid`).
        Raises RuntimeStatusError(CACHE_FULL) when n > capacity (a bundle built with C < S).
        """
        idx = np.flatnonzero(slot_valid > 0.5)  # [n] prefill slots, in sequence order
        n = len(idx)
        if n > self.capacity:
            raise RuntimeStatusError(Status.CACHE_FULL, f"the prompt fills {n} cache slots, the bundle has {self.capacity}")
        for dst, src in zip(self.keys + self.values, list(keys) + list(values)):
            dst[:, :n] = src[:, idx]
            # slots >= n are left as they are: masked by `valid`, and never-written zero pages cost no memory
        self.valid[:n] = 1.0
        self.valid[n:] = 0.0
        self.length = n
        return n

    def append(self, new_keys, new_values) -> int:
        """Writes one token's K/V (per layer [Hkv_l, 1, Dh]) into slot `length`; returns that slot.

        Raises RuntimeStatusError(CACHE_FULL) when every slot is taken.
        """
        if self.full:
            raise RuntimeStatusError(Status.CACHE_FULL, f"the KV cache is full ({self.capacity} slots)")
        slot = self.length
        for dst, src in zip(self.keys + self.values, list(new_keys) + list(new_values)):
            dst[:, slot] = src[:, 0]
        self.valid[slot] = 1.0
        self.length = slot + 1
        return slot
