"""Rewrites: small passes over the torch modules before export (README "Rewrites").

Each pass is `(model, spec) -> RewriteReport` and edits a LlavaNextForConditionalGeneration in place
so that transformers' own forward/generate still runs on it: that rewritten model is the reference
the exported graphs are compared with. Passes:

    heads.py    language-model head pruning by KV group (q/k/v/o sliced, the KV cache shrinks)
    layers.py   static language-model layer skipping (layers leave the ModuleList)

`plan.py` turns the recipe's `[rewrites]` table (+ calibration stats) into an explicit per-layer
`LMRecord`, the form the manifest stores and `compare` re-applies to a freshly loaded source model.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RewriteReport:
    """What one pass changed; its truth value is "changed something"."""

    name: str
    changes: list[str] = field(default_factory=list)  # one human-readable line per change

    def __bool__(self) -> bool:
        return bool(self.changes)

    def summary(self) -> str:
        return f"{self.name}: " + ("; ".join(self.changes) if self.changes else "no change")


def lm_layers(model):
    """The language model's decoder layers (a ModuleList) of a LlavaNextForConditionalGeneration."""
    return model.model.language_model.layers


def lm_kv_heads(model) -> tuple[int, ...]:
    """KV heads of each language-model layer as the modules hold them now (after any pruning)."""
    return tuple(layer.self_attn.k_proj.out_features // layer.self_attn.head_dim for layer in lm_layers(model))
