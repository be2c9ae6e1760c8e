"""Peak resident memory of a bundle's run against its weights plus KV cache: the runtime's defaults, then alternatives.

    flock /tmp/edgeprune-7b.lock nice -n 5 .venv/bin/python scripts/record_result.py \\
        docs/results/peak-memory-7b-shape-fast.json -- .venv/bin/python scripts/peak_memory.py export/fast7b

Settings (SETTINGS): `default` (the runtime as shipped: no CPU arena; a quantized bundle's prefill in steps of 128
slots), then for comparison `arena_on` (EDGEPRUNE_CPU_ARENA=1: ONNX Runtime's CPU arena in every session) and
`prefill_one_call` (EDGEPRUNE_PREFILL_CHUNK=0: all prefill slots in one step call, as before). Each setting runs
`edgeprune bench`'s bundle worker (edgeprune_runtime only, the built-in sample image and prompt, 32 tokens, EOS
ignored) in its own process and reads its VmHWM; weights = lm.weights + vision.weights, cache = every layer's K
and V at full capacity (as `bench` reports them). Prints one JSON object with provenance; `same_tokens`: every
setting generated the default's tokens.

--stages adds, per setting, one more run (scripts/memory_stages.py) that reads the resident memory after the
imports, after each ONNX Runtime session is created, after vision, prefill and decode, each stage's own peak,
and how much of it is file-backed (the mapped weights) or private.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# setting -> its environment variables (the runtime's defaults first; env.py)
SETTINGS = {"default": {}, "arena_on": {"EDGEPRUNE_CPU_ARENA": "1"}, "prefill_one_call": {"EDGEPRUNE_PREFILL_CHUNK": "0"}}
ENV_NAMES = ("EDGEPRUNE_CPU_ARENA", "EDGEPRUNE_PREFILL_CHUNK")  # unset for the default, whatever the caller's environment


def _child(command: list[str], env: dict) -> dict | None:
    """The last stdout line of `command` as JSON, or None after printing the `error:` line of its failure."""
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        print(f"error: the bundle run failed: {tail}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--stages", action="store_true", help="also the resident memory after each stage (memory_stages.py)")
    args = ap.parse_args(argv)

    from edgeprune.provenance import provenance
    from edgeprune.sample_image import SAMPLE_PROMPT, write_sample_image

    if not (Path(args.bundle) / "manifest.json").is_file():
        print(f"error: {args.bundle} is not a bundle (no manifest.json); export one with `edgeprune export`", file=sys.stderr)
        return 2
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        image = str(write_sample_image(Path(tmp) / "sample.png"))
        for name, variables in SETTINGS.items():
            env = {k: v for k, v in os.environ.items() if k not in ENV_NAMES} | variables
            request = [args.bundle, image, SAMPLE_PROMPT, str(args.max_new_tokens)]
            r = _child([sys.executable, "-m", "edgeprune.bench", "bundle", *request], env)
            if r is None:
                return 2
            r["peak_rss_vs_weights_plus_cache"] = r["peak_rss_bytes"] / (r["weights_bytes"] + r["cache_bytes"])
            if args.stages:
                staged = _child([sys.executable, str(ROOT / "scripts" / "memory_stages.py"), *request], env)
                if staged is None:
                    return 2
                r["stages"] = staged["stages"]
            runs[name] = r
    same = all(run["token_ids"] == runs["default"]["token_ids"] for run in runs.values())
    print(json.dumps({"bundle": args.bundle, "prompt": SAMPLE_PROMPT, **runs, "same_tokens": same,
                      "provenance": provenance()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
