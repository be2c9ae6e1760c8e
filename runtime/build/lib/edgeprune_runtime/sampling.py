"""Next-token choice from logits: greedy (temperature 0) or seeded temperature + top-p sampling."""

from __future__ import annotations

import math

import numpy as np

from edgeprune_runtime.errors import RuntimeStatusError, Status


def check_sampling(temperature: float, top_p: float, seed: int) -> None:
    """Raises RuntimeStatusError(INVALID_ARGUMENT) for a temperature < 0, top_p outside (0, 1] or seed < 0."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if not (isinstance(top_p, (int, float)) and 0.0 < top_p <= 1.0):
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"top_p must be in (0, 1], got {top_p!r}")
    if not (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0):
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"seed must be an integer >= 0, got {seed!r}")


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z -= z.max()
    p = np.exp(z)
    return p / p.sum()


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
        """logits [vocab] -> token id."""
        if self.temperature == 0.0:
            return int(np.argmax(logits))
        probs = top_p_filter(softmax(logits, self.temperature), self.top_p)
        cdf = np.cumsum(probs)
        return int(min(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right"), len(cdf) - 1))
