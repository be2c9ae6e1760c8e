"""TensorRT figures for the README: engine build times and sizes, and `check`'s memory estimate per target.

    python scripts/trt_figures.py BUNDLE --out docs/results/trt-<name>.json [--lm-layers 32] [--target rtx]

Builds BUNDLE's engines for `--target` (a CPU-only TensorRT-RTX build here), then runs `check` for every
target profile (memory estimate, scaled with --lm-layers to a full-depth model), and writes one JSON with
the provenance of the run. The bundle gains `engines/<target>/`, as with `edgeprune build`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeprune.provenance import provenance, write_json  # noqa: E402
from edgeprune.trt.build import build_bundle  # noqa: E402
from edgeprune.trt.check import check_bundle  # noqa: E402
from edgeprune.trt.targets import get_target, targets  # noqa: E402
from edgeprune_runtime.manifest import load_manifest  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--out", required=True)
    ap.add_argument("--target", default="rtx", help="target to build engines for")
    ap.add_argument("--lm-layers", type=int, help="memory estimates as if the LM had N layers")
    args = ap.parse_args()

    manifest = load_manifest(args.bundle)
    graphs = manifest.graphs
    weights = {"vision": manifest.path(graphs["vision"]["weights"]).stat().st_size,
               "lm": manifest.path(graphs["lm_weights"]).stat().st_size}
    entry = build_bundle(args.bundle, get_target(args.target))
    engines = {name: {"bytes": e["bytes"], "build_seconds": e["build_seconds"], "graph": e["graph"]}
               for name, e in entry["engines"].items()}
    estimates = {}
    for name, target in targets().items():
        report = check_bundle(args.bundle, target, use_parser=False, lm_layers=args.lm_layers)
        estimates[name] = {**report.memory.to_dict(), "fits": report.memory.total_bytes <= report.memory.device_bytes}
    result = {
        "provenance": provenance(),
        "recorded_command": " ".join(["python scripts/trt_figures.py", *sys.argv[1:]]),
        "bundle": {"source": manifest.data["source"]["model"], "options": manifest.data["source"].get("options", {}),
                   "budget": manifest.data["recipe"]["budget"], "precision": manifest.data["onnx"]["precision"],
                   "weights_bytes": weights},
        "build": {"target": args.target, "library": entry["library"], "version": entry["version"],
                  "compute_capabilities": entry["compute_capabilities"], "engines": engines,
                  "engine_bytes": sum(e["bytes"] for e in engines.values()),
                  "engines_vs_weights": sum(e["bytes"] for e in engines.values()) / sum(weights.values())},
        "memory_estimates": {"lm_layers": args.lm_layers or manifest.shapes.num_layers, "targets": estimates},
    }
    print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
