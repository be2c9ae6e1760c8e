"""In-LLM visual-token dropping and SkipDecode: the recipe's schedule strings, parsed and checked.

Neither rewrite edits the torch modules: both are static properties of the exported language-model
graphs (graphs.PrefillGraph / StepGraph gather or mask the kept visual slots; DecodeGraph(skip=k) starts at
layer k), recorded in the manifest (`shapes.layer_visual_slots`, `skip_decode`) for the runtime.

    drop_visual_after = "L:KEEP[,L2:KEEP2...]"   after LM layer L (0-based, counting the layers that run,
                                                 i.e. after --skip-layers) only the KEEP visual slots the
                                                 last text token attends to most go on; KEEP = 0: YOPO,
                                                 the visual tokens leave the sequence
    skip_decode = "POS:K[,POS2:K2...]"           from decode position POS on (0 = the first generated token
                                                 fed to a decode step) the lowest K LM layers do not run
"""

from __future__ import annotations

from edgeprune.errors import ConfigError
from edgeprune_runtime.manifest import SkipDecode


def _pairs(text: str, flag: str, example: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        a, sep, b = part.strip().partition(":")
        try:
            pair = (int(a), int(b)) if sep else None
        except ValueError:
            pair = None
        if pair is None or min(pair) < 0:
            raise ConfigError(f"{flag}: {part.strip()!r} is not A:B with integers >= 0 (e.g. {example})")
        out.append(pair)
    return out


def parse_drop_visual(text: str) -> tuple[tuple[int, int], ...]:
    """'1:64,2:16' -> ((1, 64), (2, 16)); '' -> () (off). ConfigError for bad syntax, layers that do not
    increase or KEEP that does not decrease (visual tokens never come back)."""
    text = text.strip()
    if not text:
        return ()
    stages = _pairs(text, "--drop-visual-after", "1:64 or 1:64,3:16")
    for (l0, k0), (l1, k1) in zip(stages, stages[1:]):
        if not (l1 > l0 and k1 < k0):
            raise ConfigError(f"--drop-visual-after {text!r}: layers must increase and KEEP decrease from stage to stage")
    return tuple(stages)


def parse_skip_decode(text: str) -> SkipDecode:
    """'32:1,64:2' -> SkipDecode(((32, 1), (64, 2))); '' -> no schedule. ConfigError for bad syntax or a
    schedule that is not monotone (positions and skipped layers must both increase, skips from 1)."""
    text = text.strip()
    if not text:
        return SkipDecode()
    stages = _pairs(text, "--skip-decode", "32:1,64:2")
    if any(k < 1 for _, k in stages):
        raise ConfigError(f"--skip-decode {text!r}: each stage skips at least 1 layer")
    for (p0, k0), (p1, k1) in zip(stages, stages[1:]):
        if not (p1 > p0 and k1 > k0):
            raise ConfigError(f"--skip-decode {text!r} is not monotone: positions and skipped layers must both "
                              "increase (an earlier token must run every layer a later one runs)")
    return SkipDecode(tuple(stages))


def layer_visual_slots(stages: tuple[tuple[int, int], ...], num_layers: int, visual_slots: int) -> tuple[int, ...]:
    """V_l per running LM layer for drop stages ((L, KEEP), ...). ConfigError for a layer with no layer after it
    or a KEEP that keeps every visual slot."""
    if not stages:
        return ()
    for layer, keep in stages:
        if layer >= num_layers - 1:
            raise ConfigError(f"--drop-visual-after {layer}:{keep}: the language model runs layers 0..{num_layers - 1}; "
                              f"no layer follows layer {layer} (use 0..{num_layers - 2})")
        if keep >= visual_slots:
            raise ConfigError(f"--drop-visual-after {layer}:{keep}: the bundle has {visual_slots} visual slots; "
                              f"KEEP must be below that to drop any")
    out, v = [], visual_slots
    keep_after = dict(stages)
    for i in range(num_layers):
        out.append(v)
        v = keep_after.get(i, v)
    return tuple(out)


def check_skip_decode(schedule: SkipDecode, num_layers: int) -> None:
    """ConfigError when a stage would skip every running layer."""
    for start, k in schedule.stages:
        if k >= num_layers:
            raise ConfigError(f"--skip-decode {start}:{k}: the language model runs {num_layers} layers; "
                              f"skip at most {num_layers - 1}")
