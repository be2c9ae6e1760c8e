"""What many test modules share: the installed `edgeprune` CLI run as a subprocess, and whether TensorRT-RTX's
parser/builder is importable (the `tensorrt`-marked tests skip with that reason where it is not)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EDGEPRUNE = Path(sys.executable).with_name("edgeprune")

try:
    import tensorrt_rtx_bindings  # noqa: F401

    HAVE_RTX = True
except ImportError:
    HAVE_RTX = False

needs_rtx = pytest.mark.skipif(not HAVE_RTX, reason="TensorRT-RTX is not installed (pip install 'edgeprune[trt-rtx]')")


def cli(*args, cwd=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`edgeprune ARGS...` as a user runs it; arguments may be paths or numbers."""
    return subprocess.run([str(EDGEPRUNE), *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd)
