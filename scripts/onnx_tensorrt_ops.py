"""Regenerates edgeprune/trt/onnx_tensorrt_ops.json from onnx-tensorrt's operator support matrix.

    git clone https://github.com/onnx/onnx-tensorrt && python scripts/onnx_tensorrt_ops.py onnx-tensorrt

Reads `docs/operators.md` at each release branch below (the parser that ships in that TensorRT
version) and records, per operator, whether it is supported, its types and its restrictions.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# TensorRT version -> onnx-tensorrt branch whose parser it ships (10.1 is the newest branch in the
# matrix we read; later 10.x parsers only add operators).
BRANCHES = {"8.5": "release/8.5-GA", "8.6": "release/8.6-GA", "10.1": "release/10.1-GA"}
OUT = Path(__file__).resolve().parents[1] / "edgeprune" / "trt" / "onnx_tensorrt_ops.json"


def parse_matrix(markdown: str) -> dict[str, dict]:
    ops = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or cells[1] not in ("Y", "N"):
            continue
        ops[cells[0]] = {"supported": cells[1] == "Y",
                         "types": [t.strip() for t in cells[2].split(",") if t.strip()] if len(cells) > 2 else [],
                         "restrictions": cells[3] if len(cells) > 3 else ""}
    return ops


def main(repo: str) -> None:
    table = {}
    for version, branch in BRANCHES.items():
        git = ["git", "-C", repo]
        commit = subprocess.check_output([*git, "rev-parse", branch], text=True).strip()
        text = subprocess.check_output([*git, "show", f"{branch}:docs/operators.md"], text=True)
        table[version] = {"source": f"onnx/onnx-tensorrt docs/operators.md @ {branch} ({commit[:12]})",
                          "ops": parse_matrix(text)}
    OUT.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}: " + ", ".join(f"{v} ({len(t['ops'])} ops)" for v, t in table.items()))


if __name__ == "__main__":
    main(sys.argv[1])
