"""Visual-token selection as static graph ops: a data-dependent *choice* of a fixed number K.

Each strategy maps per-patch scores and validity to K indices into the flattened [P*N] patch
axis. Padding patches are never chosen while real ones remain; when an image has fewer real
patches than K, the surplus indices point at padding and the caller marks those slots invalid.
"""

from __future__ import annotations

import torch

PADDING_PENALTY = 1.0e9  # pushes padding below every real score (CLS-attention sums lie in [0, heads])


def global_topk(scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    """The K highest-scoring real patches over all partitions. scores/valid [P*N] -> indices [K]."""
    masked = scores + (valid - 1.0) * PADDING_PENALTY
    return torch.topk(masked, k, largest=True, sorted=False).indices


STRATEGIES = {"global-topk": global_topk}


def select_tokens(strategy: str, scores: torch.Tensor, valid: torch.Tensor, k: int) -> torch.Tensor:
    return STRATEGIES[strategy](scores, valid, k)
