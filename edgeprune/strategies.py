"""What each token-selection strategy needs, without importing torch (recipes validate against this).

The implementations live in `edgeprune.selection`, registered under these names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StrategySpec:
    name: str
    layout_inputs: tuple[str, ...] = ()  # layout feeds beyond patch_valid / patch_key / patch_row
    early_scores: bool = False  # needs layer-0 CLS attention
    keys: bool = False  # needs the feature layer's key projections
    newlines: bool = True  # False: never emits newline slots


SPECS: dict[str, StrategySpec] = {s.name: s for s in (
    StrategySpec("hired", layout_inputs=("base_region",), early_scores=True),
    StrategySpec("hired-reference", layout_inputs=("partition_real", "released_valid", "released_key"),
                 early_scores=True, newlines=False),
    StrategySpec("visionzip", keys=True),
    StrategySpec("global-topk"),
    StrategySpec("uniform"),
    StrategySpec("random"),
)}
