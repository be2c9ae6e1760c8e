"""The fixed-size KV cache: per-layer buffers allocated once on the backend's device, written in place.

Layout (README "How it works"): layer l has K and V buffers [Hkv_l, C, Dh] (a list, since head
pruning may give layers different Hkv) and all layers share `valid` [C] (1 = slot holds a token).
Valid tokens are kept compacted in slots 0..length-1, so a slot index is also the token's
position (positions count valid slots), and the next token goes to slot `length`.

Where the buffers live is the device's business (backends/device.py): host memory for the CPU backend,
GPU memory for the CUDA and TensorRT backends. Every write into the cache is a 2-D copy on that device
(`Device.copy2d`), so the cache never travels to the host: one token's slot is Hkv_l rows of Dh values, one
row every C*Dh values of the buffer. `valid` stays on the host: the decode graph reads its C floats per step.
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
    def __init__(self, kv_heads, capacity: int, head_dim: int, dtype=np.float32, device=HOST):
        self.capacity = int(capacity)
        self.head_dim = int(head_dim)
        self.device = device
        self.key_buffers: list[Buffer] = [device.zeros((h, capacity, head_dim), dtype) for h in kv_heads]  # [Hkv_l, C, Dh]
        self.value_buffers: list[Buffer] = [device.zeros((h, capacity, head_dim), dtype) for h in kv_heads]
        self.valid = np.zeros(capacity, np.float32)  # [C], host
        self.length = 0

    @property
    def keys(self) -> list[np.ndarray]:
        """Per layer [Hkv_l, C, Dh] numpy views of the key buffers (host cache only)."""
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
    def full(self) -> bool:
        return self.length >= self.capacity

    def fill_from_prefill(self, keys, values, slot_valid: np.ndarray) -> int:
        """Copies the K/V of the valid prefill slots, compacted, into slots 0..n-1; returns n.

        keys/values: per layer [Hkv_l, S, Dh], Buffers on the cache's device (numpy arrays for a host cache);
        slot_valid [S] (see `prefill_slot_valid`). One 2-D copy per run of consecutive valid slots per buffer.
        Raises RuntimeStatusError(CACHE_FULL) when n > capacity (a bundle built with C < S).
        """
        runs = valid_runs(slot_valid)
        n = sum(count for _, count in runs)
        if n > self.capacity:
            raise RuntimeStatusError(Status.CACHE_FULL, f"the prompt fills {n} cache slots, the bundle has {self.capacity}")
        for dst, src in zip(self.key_buffers + self.value_buffers, [self._as_buffer(b) for b in list(keys) + list(values)]):
            heads, slots, _ = src.shape  # [Hkv_l, S, Dh]
            slot_bytes = self.head_dim * dst.dtype.itemsize
            at = 0
            for first, count in runs:
                self.device.copy2d(dst, at * slot_bytes, self.capacity * slot_bytes,
                                   src, first * slot_bytes, slots * slot_bytes, count * slot_bytes, heads)
                at += count
            # slots >= n are left as they are: masked by `valid`, and never-written zero pages cost no memory
        self.device.synchronize()
        self.valid[:n] = 1.0
        self.valid[n:] = 0.0
        self.length = n
        return n

    def append(self, new_keys, new_values) -> int:
        """Writes one token's K/V (per layer [Hkv_l, 1, Dh], Buffers or host arrays) into slot `length`; returns that slot.

        Raises RuntimeStatusError(CACHE_FULL) when every slot is taken.
        """
        if self.full:
            raise RuntimeStatusError(Status.CACHE_FULL, f"the KV cache is full ({self.capacity} slots)")
        slot = self.length
        for dst, src in zip(self.key_buffers + self.value_buffers, [self._as_buffer(b) for b in list(new_keys) + list(new_values)]):
            slot_bytes = self.head_dim * dst.dtype.itemsize
            self.device.copy2d(dst, slot * slot_bytes, self.capacity * slot_bytes, src, 0, slot_bytes, slot_bytes, src.shape[0])
        self.device.synchronize()
        self.valid[slot] = 1.0
        self.length = slot + 1
        return slot

    def _as_buffer(self, data) -> Buffer:
        """A Buffer as it is; a numpy array (host cache only) wrapped without a copy, in the cache's dtype."""
        if isinstance(data, Buffer):
            return data
        if self.device is not HOST:
            raise RuntimeStatusError(Status.INTERNAL_ERROR, "a host array was given to a GPU cache (a bug in edgeprune_runtime)")
        import onnxruntime as ort

        array = np.ascontiguousarray(data, dtype=self.key_buffers[0].dtype if self.key_buffers else np.float32)
        return Buffer(ort.OrtValue.ortvalue_from_numpy(array), tuple(array.shape), array.dtype, array)
