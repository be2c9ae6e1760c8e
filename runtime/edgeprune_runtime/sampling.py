"""Next-token choice from logits: greedy (temperature 0) or seeded temperature + top-p sampling."""

from __future__ import annotations

import math
import numbers

import numpy as np

from edgeprune_runtime import checks
from edgeprune_runtime.errors import RuntimeStatusError, Status


def _real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_sampling(temperature: float, top_p: float, seed: int) -> None:
    """Raises RuntimeStatusError(INVALID_ARGUMENT) for a temperature that is not a finite number >= 0, a top_p
    outside (0, 1] (NaN included) or a seed that is not an integer >= 0. Every value that passes samples
    without NaN: see `softmax`."""
    if not (_real(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"temperature must be a finite number >= 0 (0 = greedy), got {checks.show(temperature)}")
    if not (_real(top_p) and 0.0 < top_p <= 1.0):
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"top_p must be in (0, 1], got {checks.show(top_p)}")
    if not (isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)) and seed >= 0):
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"seed must be an integer >= 0, got {checks.show(seed)}")


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / temperature) in float64, for finite logits and any finite temperature > 0.

    The maximum is subtracted before dividing, so every exponent is <= 0: a tiny temperature (even a
    subnormal one) gives -inf for every token below the maximum and 0 for the maximum, i.e. the greedy
    choice, never inf - inf = NaN; a huge one gives the uniform distribution."""
    z = logits.astype(np.float64)
    z -= z.max()
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        z /= temperature  # 0 / tiny stays 0; negative / tiny becomes -inf
    p = np.exp(z)
    return p / p.sum()  # the maximum contributes exp(0) = 1, so the sum is >= 1


def top_p_filter(probs: np.ndarray, top_p: float) -> np.ndarray:
    """Keeps the smallest set of most likely tokens whose mass reaches `top_p` (at least one), renormalized.

    Ties are broken by token id (stable sort), so the result is deterministic.
    """
    if top_p >= 1.0:
        return probs
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    keep = min(int(np.searchsorted(cum, top_p, side="left")) + 1, len(order))
    out = np.zeros_like(probs)
    out[order[:keep]] = probs[order[:keep]]
    return out / out.sum()


class Sampler:
    """Chooses token ids; with the same seed and logits, the same ids on every machine (numpy PCG64)."""

    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int = 0):
        check_sampling(temperature, top_p, seed)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self._rng = np.random.default_rng(int(seed))

    def __call__(self, logits: np.ndarray) -> int:
        """logits [vocab] -> token id. Raises RuntimeStatusError(INFERENCE_FAILED) for logits that are not all
        finite (a broken graph): no token is chosen from NaN."""
        if not np.isfinite(logits).all():
            bad = int(np.flatnonzero(~np.isfinite(logits))[0])
            raise RuntimeStatusError(Status.INFERENCE_FAILED, f"the language model produced a non-finite logit "
                                     f"({logits[bad]} for token {bad}); the bundle's graphs or weights are broken, re-export")
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        probs = top_p_filter(softmax(logits, self.temperature), self.top_p)
        cdf = np.cumsum(probs)
        return int(min(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"), len(cdf) - 1))
