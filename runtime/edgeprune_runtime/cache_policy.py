"""What happens when the fixed-size KV cache is full: stop, or evict slots in place and go on.

    stop          generation ends with stop_reason "cache_full" (the default)
    sink-window   keep the first S slots (attention sinks) and the most recent ones: evict the oldest non-sink slots
    heavy-hitter  (H2O / MustDrop's decode stage) evict the unpinned slots with the least attention mass accumulated
                  over the decode steps; pinned: the S sinks and the image's kept visual slots (`pin_image`); kept
                  while older slots can go: the most recent `chunk` slots (they have had too few steps to accumulate
                  mass; H2O keeps a recent window for the same reason)

Eviction keeps the cache's invariant (kvcache.py): valid slots are a prefix and the key in slot i carries rotary
position i (StreamingLLM's in-cache positions). `KVCache.evict` moves the survivors left in place, in order, and
re-rotates every moved key by minus the number of slots evicted before it; the next token gets position `length`.
Slots are evicted `chunk = max(1, (C - S) // 8)` at a time, so the re-rotation (a pass over the moved keys) is paid
once per chunk of tokens, not per token.

The bundle records its default policy and what the policies need in the manifest's `cache` section (written only
for bundles exported with a policy other than stop): the rotary inverse frequencies [Dh/2] (re-rotation) and
whether the decode/step graphs output `attn_mass` [C] (heavy-hitter). A generator may ask for another policy at run
time; one that the bundle cannot serve is refused in one line naming the re-export.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeprune_runtime import checks
from edgeprune_runtime.errors import RuntimeStatusError, Status, bundle_invalid

STOP, SINK_WINDOW, HEAVY_HITTER = "stop", "sink-window", "heavy-hitter"
POLICIES = (STOP, SINK_WINDOW, HEAVY_HITTER)
DEFAULT_SINKS = 4  # StreamingLLM keeps 4 initial tokens as attention sinks


@dataclass(frozen=True)
class CachePolicy:
    """One generator's policy: `name` in POLICIES, `sinks` first slots never evicted, `pin_image` (heavy-hitter
    only) keeps the image's kept visual slots from prefill."""

    name: str = STOP
    sinks: int = DEFAULT_SINKS
    pin_image: bool = True

    @property
    def evicts(self) -> bool:
        return self.name != STOP


def check_policy_name(name: Any, where: str = "cache policy") -> str:
    """`name` if it is one of POLICIES; INVALID_ARGUMENT listing them otherwise."""
    if not isinstance(name, str) or name not in POLICIES:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"{where} {checks.show(name)} is not one of "
                                 f"{', '.join(POLICIES)}")
    return name


@dataclass(frozen=True)
class BundleCache:
    """The manifest's `cache` section: the bundle's default policy and what eviction needs from the graphs."""

    default: CachePolicy
    inv_freq: np.ndarray | None  # [Dh/2] float64: the rotary inverse frequencies of the keys; None: cannot re-rotate
    attn_mass: bool  # the decode/step graphs output attn_mass [C]

    @classmethod
    def from_manifest(cls, value: Any, head_dim: int, capacity: int) -> "BundleCache":
        """From manifest `cache` (untrusted; absent = a stop bundle). BUNDLE_INVALID names the fault."""
        if value is None:
            return cls(CachePolicy(), None, False)
        d = checks.need_dict(value, "manifest `cache`")
        for key in ("policy", "sinks", "pin_image", "attn_mass", "rope_inv_freq"):
            if key not in d:
                raise bundle_invalid(f"manifest `cache` lacks {key!r}; re-export the bundle")
        try:
            name = check_policy_name(d["policy"], "manifest cache.policy")
        except RuntimeStatusError as e:
            raise bundle_invalid(e.message + "; re-export the bundle") from None
        sinks = checks.need_int(d["sinks"], "manifest cache.sinks", 0, capacity - 1)
        for key in ("pin_image", "attn_mass"):
            if not isinstance(d[key], bool):
                raise bundle_invalid(f"manifest cache.{key} must be true or false; re-export the bundle")
        # [Dh/2]: RoPE rotates the whole head (Llama's rotate_half form)
        freqs = [checks.need_number(f, "manifest cache.rope_inv_freq[]")
                 for f in checks.need_list(d["rope_inv_freq"], "manifest cache.rope_inv_freq", head_dim // 2, head_dim // 2)]
        # RoPE's base**(-2j/Dh), which scaled variants (linear, llama3, yarn) only divide: (0, 1] radians per position.
        # Bounded, every re-rotation angle (shift < C) is finite; an overflowing one would write NaN keys.
        if not all(0.0 < f <= 1.0 for f in freqs):
            raise bundle_invalid("manifest cache.rope_inv_freq must hold rotary inverse frequencies in (0, 1]; "
                                 "re-export the bundle")
        if name == HEAVY_HITTER and not d["attn_mass"]:
            raise bundle_invalid("manifest cache.policy is heavy-hitter but attn_mass is false; re-export the bundle")
        return cls(CachePolicy(name, sinks, d["pin_image"]), np.asarray(freqs, np.float64), d["attn_mass"])

    def resolve(self, name: str | None, sinks: int | None, pin_image: bool | None, capacity: int,
                per_layer: bool, on_host: bool) -> CachePolicy:
        """The policy a generator runs: the bundle's default with the given overrides (None = the default's).

        A bundle whose own default evicts runs `stop` on a backend whose cache is not on the host (CUDA, TensorRT),
        so one bundle serves both; an evicting policy asked for by name there is refused.

        Raises RuntimeStatusError(INVALID_ARGUMENT) for an unknown name, a sink count that leaves no window, a
        policy this bundle or backend cannot serve (each naming the fix)."""
        if name is None and not on_host:
            name = STOP  # the bundle's default, not the caller's choice: the device cache cannot evict
        policy = CachePolicy(check_policy_name(name, "--cache-policy") if name is not None else self.default.name,
                             self.default.sinks if sinks is None else sinks,
                             self.default.pin_image if pin_image is None else pin_image)
        check_sinks(policy.sinks, capacity)
        if not policy.evicts:
            return policy
        if per_layer:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"--cache-policy {policy.name} needs every layer to hold "
                                     "the same tokens; this bundle drops visual tokens per layer or skips layers in "
                                     "decode (--drop-visual-after, --skip-decode): use --cache-policy stop")
        if not on_host:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"--cache-policy {policy.name} evicts in a host cache; "
                                     "run it with --backend cpu, or use --cache-policy stop on a GPU")
        if policy.name == HEAVY_HITTER and not self.attn_mass:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, "this bundle's decode graph has no attn_mass output, "
                                     "which heavy-hitter needs; re-export with --cache-policy heavy-hitter")
        if self.inv_freq is None:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"this bundle was exported without cache eviction data "
                                     f"(the keys' rotary frequencies); re-export with --cache-policy {policy.name}")
        return policy


def check_sinks(sinks: Any, capacity: int) -> int:
    """`sinks` if it is an integer in [0, capacity - 1] (at least one slot of window); INVALID_ARGUMENT otherwise."""
    if isinstance(sinks, (bool, np.bool_)) or not isinstance(sinks, (int, np.integer)) or not 0 <= sinks < capacity:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"--cache-sinks must be an integer from 0 to {capacity - 1} "
                                 f"(smaller than the cache's {capacity} slots, leaving a window), got {checks.show(sinks)}")
    return int(sinks)


def eviction_chunk(capacity: int, sinks: int) -> int:
    """Slots evicted at once when the cache is full: an eighth of the window (C - S), at least one."""
    return max(1, (capacity - sinks) // 8)


def choose_evictions(policy: str, count: int, pinned: np.ndarray, mass: np.ndarray | None = None) -> np.ndarray:
    """The `count` slots to evict, ascending. pinned [n] bool (n = valid slots, never chosen); mass [n] the
    accumulated attention mass (heavy-hitter). sink-window: the oldest unpinned slots; heavy-hitter: the unpinned
    slots of least mass (ties: the older slot). Fewer than `count` when fewer are unpinned."""
    free = np.flatnonzero(~pinned)  # ascending slot indices
    if policy == HEAVY_HITTER:
        free = free[np.argsort(mass[free], kind="stable")]
    return np.sort(free[:count])


def rerotate(keys: np.ndarray, shift: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """keys [H, n, Dh] rotated by RoPE (rotate_half form) -> the same keys at positions `shift` [n] lower.

    RoPE turns each pair (x_j, x_{j+Dh/2}) by the angle p * inv_freq[j]; rotations compose, R(a)R(b) = R(a+b), so
    turning by -shift * inv_freq moves a key from position p to p - shift (an attention scaling factor, which
    multiplies cos and sin alike, is kept as it is). Computed in float64, returned in the keys' dtype."""
    angle = -shift.astype(np.float64)[:, None] * inv_freq[None, :]  # [n, Dh/2]
    cos, sin = np.cos(angle), np.sin(angle)
    k = keys.astype(np.float64)
    half = k.shape[-1] // 2
    lo, hi = k[..., :half], k[..., half:]
    out = np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], axis=-1)
    return out.astype(keys.dtype)


class Evictor:
    """One conversation's policy over its cache: per slot the accumulated attention mass and whether it is pinned,
    moved along with the slots; `make_room(n)` evicts in chunks until n slots are free."""

    def __init__(self, policy: CachePolicy, cache, inv_freq: np.ndarray, image_slots: tuple[int, int] = (0, 0)):
        """cache: a host KVCache filled by the prefill; image_slots: (first, count) of the image's visual slots in it."""
        self.policy = policy
        self.cache = cache
        self.inv_freq = inv_freq
        capacity = cache.capacity
        self.chunk = eviction_chunk(capacity, policy.sinks)
        self.mass = np.zeros(capacity, np.float64)  # [C] attention mass each slot received, summed over steps
        self.pinned = np.zeros(capacity, bool)  # [C]
        self.pinned[:policy.sinks] = True
        if policy.name == HEAVY_HITTER and policy.pin_image:
            first, count = image_slots
            self.pinned[first:first + count] = True
        self.evicted = 0  # slots evicted so far

    @property
    def needs_mass(self) -> bool:
        """Whether the graphs' attn_mass must be bound and observed (heavy-hitter)."""
        return self.policy.name == HEAVY_HITTER

    def observe(self, attn_mass: np.ndarray) -> None:
        """Adds one step's attention mass [C] (summed over heads and layers) to the slots it was paid to."""
        n = self.cache.lengths[0]
        self.mass[:n] += attn_mass[:n]

    def blocked(self) -> np.ndarray:
        """[n] bool: the valid slots that may not be evicted now (pinned, and heavy-hitter's most recent chunk)."""
        n = self.cache.lengths[0]
        blocked = self.pinned[:n].copy()
        if self.policy.name == HEAVY_HITTER:
            blocked[max(0, n - self.chunk):] = True
        return blocked

    def make_room(self, needed: int) -> int:
        """Evicts until `needed` slots are free (at least a chunk at a time); returns how many it evicted. When the
        slots outside heavy-hitter's recent chunk cannot free `needed`, the least-mass unpinned slots go, recent or not
        (only as many as needed).

        Raises RuntimeStatusError(CACHE_FULL) when the pinned slots leave too few to evict."""
        room = self.cache.room()
        if room >= needed:
            return 0
        count = max(self.chunk, needed - room)
        n = self.cache.lengths[0]
        slots = choose_evictions(self.policy.name, count, self.blocked(), self.mass[:n])
        if room + len(slots) < needed:  # the recent chunk is kept while older slots can go; now it gives way too
            slots = choose_evictions(self.policy.name, needed - room, self.pinned[:n], self.mass[:n])
        if room + len(slots) < needed:
            image = " and the image" if self.policy.name == HEAVY_HITTER and self.policy.pin_image else ""
            raise RuntimeStatusError(Status.CACHE_FULL, f"{needed} cache slots are needed and only {room + len(slots)} "
                                     f"can be freed: pinned slots fill the cache ({self.policy.sinks} sinks{image}); "
                                     "lower --cache-sinks or use --no-cache-pin-image")
        self.evict(slots)
        return len(slots)

    def evict(self, slots: np.ndarray) -> None:
        """Evicts `slots` (ascending) from the cache and moves the per-slot mass and pins along."""
        n = self.cache.lengths[0]
        keep = np.setdiff1d(np.arange(n), slots)
        self.cache.evict(slots, self.inv_freq)
        for per_slot in (self.mass, self.pinned):
            per_slot[:len(keep)] = per_slot[keep]
            per_slot[len(keep):] = 0
        self.evicted += len(slots)
