"""The fixed-size KV cache: per-layer numpy buffers written in place, each with its own validity mask.

Layout (README "How it works"): layer l has K and V buffers [Hkv_l, C_l, Dh] (a list: head pruning gives
layers different Hkv_l, in-LLM visual-token dropping different C_l) and a validity mask `valid[l]` [C_l]
(1 = slot holds a token). Layers can hold different tokens: a layer after a visual-token drop holds only the
kept visual tokens, and SkipDecode does not write a token into the layers it skips. Each layer keeps its
tokens compacted in slots 0..lengths[l]-1 (K already carries RoPE, so slot order does not matter to
attention); `position` counts every token the sequence has seen, the next token's position.
"""

from __future__ import annotations

import numpy as np

from edgeprune_runtime.errors import RuntimeStatusError, Status


def prefill_slot_valid(text_valid: np.ndarray, visual_valid: np.ndarray, slots_before: int) -> np.ndarray:
    """Validity [S] of the prefill sequence, in its order: text-before | visual | text-after."""
    return np.concatenate([text_valid[:slots_before], visual_valid, text_valid[slots_before:]]).astype(np.float32)


class KVCache:
    def __init__(self, kv_heads, capacity, head_dim: int, dtype=np.float32):
        """kv_heads: Hkv_l per layer; capacity: C_l per layer (a sequence) or one C for every layer."""
        capacities = [int(capacity)] * len(kv_heads) if np.isscalar(capacity) else [int(c) for c in capacity]
        self.capacities = capacities
        # np.zeros maps zero pages lazily: only slots ever written cost memory
        self.keys = [np.zeros((h, c, head_dim), dtype) for h, c in zip(kv_heads, capacities)]  # [Hkv_l, C_l, Dh] each
        self.values = [np.zeros((h, c, head_dim), dtype) for h, c in zip(kv_heads, capacities)]
        self.valid = [np.zeros(c, np.float32) for c in capacities]  # [C_l] each
        self.lengths = [0] * len(capacities)
        self.position = 0

    @property
    def capacity(self) -> int:
        """The largest layer's slots (C: every layer's cache holds C_l <= C)."""
        return max(self.capacities)

    @property
    def length(self) -> int:
        """Tokens the sequence holds (the next token's position)."""
        return self.position

    def room(self, layers=None) -> int:
        """Tokens that still fit in every layer of `layers` (default all)."""
        layers = range(len(self.capacities)) if layers is None else layers
        return min(self.capacities[i] - self.lengths[i] for i in layers)

    @property
    def full(self) -> bool:
        return self.room() <= 0

    def fill_from_prefill(self, keys, values, slot_valid) -> int:
        """Copies the K/V of each layer's valid prefill slots, compacted, into its slots 0..n_l-1; returns n_0
        (the prompt's tokens, every one of which layer 0 holds).

        keys/values: per layer [Hkv_l, S_l, Dh]; slot_valid: one [S] for every layer (see `prefill_slot_valid`)
        or per layer [S_l]. Raises RuntimeStatusError(CACHE_FULL) when n_l > C_l (a bundle built with C < S).
        """
        per_layer = slot_valid if isinstance(slot_valid, (list, tuple)) else [slot_valid] * len(self.keys)
        for layer, (k, v, valid) in enumerate(zip(keys, values, per_layer)):
            idx = np.flatnonzero(np.asarray(valid) > 0.5)  # [n_l] prefill slots, in the layer's order
            n = len(idx)
            if n > self.capacities[layer]:
                where = f" in layer {layer}" if len(set(self.capacities)) > 1 else ""
                raise RuntimeStatusError(Status.CACHE_FULL, f"the prompt fills {n} cache slots{where}, "
                                         f"the bundle has {self.capacities[layer]}")
            self.keys[layer][:, :n] = k[:, idx]
            self.values[layer][:, :n] = v[:, idx]
            # slots >= n are left as they are: masked by `valid`, and never-written zero pages cost no memory
            self.valid[layer][:n] = 1.0
            self.valid[layer][n:] = 0.0
            self.lengths[layer] = n
        self.position = self.lengths[0]
        return self.position

    def append(self, new_keys, new_values, first_layer: int = 0) -> int:
        """Writes one token's K/V (per layer from `first_layer` on, [Hkv_l, 1, Dh]) into each of those layers'
        next slot; layers below `first_layer` (skipped by SkipDecode) get nothing. Returns the token's position.

        Raises RuntimeStatusError(CACHE_FULL) when a written layer has no slot left.
        """
        layers = range(first_layer, len(self.keys))
        if self.room(layers) <= 0:
            raise RuntimeStatusError(Status.CACHE_FULL, f"the KV cache is full ({self.capacity} slots)")
        for layer, k, v in zip(layers, new_keys, new_values):
            slot = self.lengths[layer]
            self.keys[layer][:, slot] = k[:, 0]
            self.values[layer][:, slot] = v[:, 0]
            self.valid[layer][slot] = 1.0
            self.lengths[layer] = slot + 1
        self.position += 1
        return self.position - 1
