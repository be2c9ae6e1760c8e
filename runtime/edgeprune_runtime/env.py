"""The one place environment variables are read (STYLE.md: a flag set to "0" must mean off).

Variables the runtime understands:

    EDGEPRUNE_THREADS     intra-op threads of every ONNX Runtime session (unset: ORT's default)
    EDGEPRUNE_LM_PREPACK  1: let ORT prepack the prefill graph's LM weights (faster prefill, one
                          extra private copy of the LM weights); unset/0: no prepacking, weights
                          stay in the one shared memory map (see engine.py)
    EDGEPRUNE_CPU_ARENA   1: sessions allocate activations from ONNX Runtime's CPU arena (ORT's own
                          default); unset/0: with malloc, so memory one session frees is reused by the
                          next. Each session's arena keeps its own peak, so with arenas the process's
                          peak is the sum of the sessions' peaks rather than the largest
                          (scripts/peak_memory.py measures both)
    EDGEPRUNE_PREFILL_CHUNK   the CPU backend's step prefill (quantized bundles) feeds the prompt's valid
                          slots in steps of this many (unset: 128, backends/select.py); 0: all S slots in
                          one call, whose attention tensors [H, S, C + S] are then the process's peak
"""

from __future__ import annotations

import os

from edgeprune_runtime.errors import RuntimeStatusError, Status

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def env_int(name: str, default: int | None = None, minimum: int | None = None) -> int | None:
    """The integer value of `name`, or `default` when unset/empty.

    Raises RuntimeStatusError(INVALID_ARGUMENT) for a value that is not an integer or is below `minimum`.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"{name}={raw!r} is not an integer; unset it or set e.g. {name}=4") from None
    if minimum is not None and value < minimum:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"{name}={value} must be >= {minimum}")
    return value


def env_flag(name: str, default: bool = False) -> bool:
    """True for 1/true/yes/on, False for 0/false/no/off/empty (case-insensitive), `default` when unset.

    Raises RuntimeStatusError(INVALID_ARGUMENT) for anything else.
    """
    if name not in os.environ:
        return default
    raw = os.environ[name].strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"{name}={os.environ[name]!r} is not a flag; use {name}=1 or {name}=0")
