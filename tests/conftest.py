"""Put the toolchain (`edgeprune`) and the runtime (`edgeprune_runtime`) on sys.path until they are pip-installed."""

import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parents[1]
for _p in (_ROOT / "runtime", _ROOT):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
