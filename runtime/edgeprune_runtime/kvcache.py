"""The fixed-size KV cache: per-layer buffers allocated once on the backend's device, written in place, each
layer with its own validity mask.

Layout (README "How it works"): layer l has K and V buffers [Hkv_l, C_l, Dh] (a list: head pruning gives
layers different Hkv_l, in-LLM visual-token dropping different C_l) and a validity mask `valid[l]` [C_l]
(1 = slot holds a token). Layers can hold different tokens: a layer after a visual-token drop holds only the
kept visual tokens, and SkipDecode does not write a token into the layers it skips. Each layer keeps its
tokens compacted in slots 0..lengths[l]-1 (K already carries RoPE, so slot order does not matter to
attention); `position` counts every token the sequence has seen, the next token's position. When every layer
holds the same tokens, key slot i carries rotary position i (prefill positions count the valid slots before),
and `evict` keeps it so (cache_policy.py: StreamingLLM's in-cache positions).

Where the buffers live is the device's business (backends/device.py): host memory for the CPU backend,
GPU memory for the CUDA and TensorRT backends. Every write into the cache is a 2-D copy on that device
(`Device.copy2d`), so the cache never travels to the host: one token's slot in layer l is Hkv_l rows of Dh
values, one row every C_l*Dh values of the buffer. The masks stay on the host: a decode step reads C_l floats.
"""

from __future__ import annotations

import numpy as np

from edgeprune_runtime.backends.device import HOST, Buffer
from edgeprune_runtime.errors import RuntimeStatusError, Status


def prefill_slot_valid(text_valid: np.ndarray, visual_valid: np.ndarray, slots_before: int) -> np.ndarray:
    """Validity [S] of the prefill sequence, in its order: text-before | visual | text-after."""
    return np.concatenate([text_valid[:slots_before], visual_valid, text_valid[slots_before:]]).astype(np.float32)


def valid_runs(slot_valid: np.ndarray) -> list[tuple[int, int]]:
    """[(first slot, count)] of each run of consecutive valid slots, in order (slot_valid [S], 1 = valid)."""
    flags = np.concatenate([[0], (np.asarray(slot_valid) > 0.5).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flags))  # starts at even, ends at odd positions
    return [(int(a), int(b - a)) for a, b in zip(edges[0::2], edges[1::2])]


class KVCache:
    def __init__(self, kv_heads, capacity, head_dim: int, dtype=np.float32, device=HOST):
        """kv_heads: Hkv_l per layer; capacity: C_l per layer (a sequence) or one C for every layer;
        device: where the buffers live (backends/device.py)."""
        capacities = [int(capacity)] * len(kv_heads) if np.isscalar(capacity) else [int(c) for c in capacity]
        self.capacities = capacities
        self.head_dim = int(head_dim)
        self.device = device
        # [Hkv_l, C_l, Dh] each; on the host np.zeros maps zero pages lazily: only slots ever written cost memory
        self.key_buffers: list[Buffer] = [device.zeros((h, c, head_dim), dtype) for h, c in zip(kv_heads, capacities)]
        self.value_buffers: list[Buffer] = [device.zeros((h, c, head_dim), dtype) for h, c in zip(kv_heads, capacities)]
        self.valid = [np.zeros(c, np.float32) for c in capacities]  # [C_l] each, host
        self.lengths = [0] * len(capacities)
        self.position = 0

    @property
    def keys(self) -> list[np.ndarray]:
        """Per layer [Hkv_l, C_l, Dh] numpy views of the key buffers (host cache only)."""
        return [self._host(b) for b in self.key_buffers]

    @property
    def values(self) -> list[np.ndarray]:
        return [self._host(b) for b in self.value_buffers]

    def _host(self, buf: Buffer) -> np.ndarray:
        if buf.host is None:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, "this KV cache lives on the GPU; only a CPU-backend cache "
                                     "has numpy views")
        return buf.host

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

        keys/values: per layer [Hkv_l, S_l, Dh], Buffers on the cache's device (numpy arrays for a host cache);
        slot_valid: one [S] for every layer (see `prefill_slot_valid`) or per layer [S_l]. One 2-D copy per run
        of consecutive valid slots per buffer. Raises RuntimeStatusError(CACHE_FULL) when n_l > C_l (a bundle
        built with C < S).
        """
        per_layer = slot_valid if isinstance(slot_valid, (list, tuple)) else [slot_valid] * len(self.key_buffers)
        for layer, (k, v, valid) in enumerate(zip(keys, values, per_layer)):
            runs = valid_runs(valid)  # the layer's prefill slots, in its order
            n = sum(count for _, count in runs)
            if n > self.capacities[layer]:
                where = f" in layer {layer}" if len(set(self.capacities)) > 1 else ""
                raise RuntimeStatusError(Status.CACHE_FULL, f"the prompt fills {n} cache slots{where}, "
                                         f"the bundle has {self.capacities[layer]}")
            for dst, src in ((self.key_buffers[layer], self._as_buffer(k)), (self.value_buffers[layer], self._as_buffer(v))):
                heads, slots, _ = src.shape  # [Hkv_l, S_l, Dh]
                slot_bytes = self.head_dim * dst.dtype.itemsize
                at = 0
                for first, count in runs:
                    self.device.copy2d(dst, at * slot_bytes, self.capacities[layer] * slot_bytes,
                                       src, first * slot_bytes, slots * slot_bytes, count * slot_bytes, heads)
                    at += count
            # slots >= n are left as they are: masked by `valid`, and never-written zero pages cost no memory
            self.valid[layer][:n] = 1.0
            self.valid[layer][n:] = 0.0
            self.lengths[layer] = n
        self.device.synchronize()
        self.position = self.lengths[0]
        return self.position

    def append(self, new_keys, new_values, first_layer: int = 0) -> int:
        """Writes T tokens' K/V (per layer from `first_layer` on, [Hkv_l, T, Dh], Buffers or host arrays; T = 1 for a
        decode step) into each of those layers' next T slots, in order; layers below `first_layer` (skipped by
        SkipDecode) get nothing. Returns the first token's position. One 2-D copy per buffer.

        Raises RuntimeStatusError(CACHE_FULL) when a written layer has fewer than T slots left.
        """
        layers = range(first_layer, len(self.key_buffers))
        t = int(new_keys[0].shape[1]) if len(new_keys) else 1
        if self.room(layers) < t:
            if t == 1:
                raise RuntimeStatusError(Status.CACHE_FULL, f"the KV cache is full ({self.capacity} slots)")
            raise RuntimeStatusError(Status.CACHE_FULL, f"{t} more tokens need cache slots, {self.room(layers)} are "
                                     f"left of {self.capacity}")
        for layer, k, v in zip(layers, new_keys, new_values):
            slot = self.lengths[layer]
            for dst, src in ((self.key_buffers[layer], self._as_buffer(k)), (self.value_buffers[layer], self._as_buffer(v))):
                slot_bytes = self.head_dim * dst.dtype.itemsize
                self.device.copy2d(dst, slot * slot_bytes, self.capacities[layer] * slot_bytes,
                                   src, 0, t * slot_bytes, t * slot_bytes, src.shape[0])
            self.valid[layer][slot:slot + t] = 1.0
            self.lengths[layer] = slot + t
        self.device.synchronize()
        self.position += t
        return self.position - t

    def clear(self) -> None:
        """Forgets every token (the buffers keep their bytes, masked by `valid`): the state of a new cache."""
        for valid in self.valid:
            valid[:] = 0.0
        self.lengths = [0] * len(self.capacities)
        self.position = 0

    def evict(self, slots, inv_freq: np.ndarray) -> None:
        """Removes the valid slots `slots` (ascending indices < length) from every layer, in place: the survivors move
        left in order, each moved key re-rotated by minus the number of evicted slots before it (cache_policy.rerotate
        with the keys' rotary inverse frequencies `inv_freq` [Dh/2]), so slot i still holds the key of rotary position
        i; values move as they are. Then `position` = the length, the next token's position.

        Host caches whose layers hold the same tokens only (cache_policy.BundleCache.resolve refuses the others)."""
        from edgeprune_runtime.cache_policy import rerotate

        slots = np.asarray(slots, np.int64)
        n = self.lengths[0]
        if len(set(self.lengths)) != 1 or len(slots) == 0:
            if len(slots) == 0:
                return
            raise RuntimeStatusError(Status.INTERNAL_ERROR, "eviction needs every layer to hold the same tokens")
        if slots[0] < 0 or slots[-1] >= n or np.any(np.diff(slots) <= 0):
            raise RuntimeStatusError(Status.INTERNAL_ERROR, f"evict takes ascending valid slots < {n}")
        first = int(slots[0])
        moved = np.setdiff1d(np.arange(first, n), slots)  # survivors after the first evicted slot, ascending
        shift = moved - np.arange(first, first + len(moved))  # evicted slots before each: its position drop
        for keys, values in zip(self.keys, self.values):  # [Hkv, C, Dh] host views
            keys[:, first:first + len(moved)] = rerotate(keys[:, moved], shift, inv_freq)  # fancy index: a copy
            values[:, first:first + len(moved)] = values[:, moved]
        length = n - len(slots)
        for layer in range(len(self.valid)):
            self.valid[layer][length:] = 0.0
            self.lengths[layer] = length
        self.position = length

    def _as_buffer(self, data) -> Buffer:
        """A Buffer as it is; a numpy array (host cache only) wrapped without a copy, in the cache's dtype."""
        if isinstance(data, Buffer):
            return data
        if self.device is not HOST:
            raise RuntimeStatusError(Status.INTERNAL_ERROR, "a host array was given to a GPU cache (a bug in edgeprune_runtime)")
        import onnxruntime as ort

        array = np.ascontiguousarray(data, dtype=self.key_buffers[0].dtype if self.key_buffers else np.float32)
        return Buffer(ort.OrtValue.ortvalue_from_numpy(array), tuple(array.shape), array.dtype, array)
