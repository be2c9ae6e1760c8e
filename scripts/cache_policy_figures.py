"""Decode tokens/s under each cache policy at 10%, 50%, 100% and 10x of the KV cache's capacity.

    .venv/bin/python scripts/record_result.py docs/results/cache-policies-7b-shape.json -- \\
        .venv/bin/python scripts/cache_policy_figures.py export/cp-7b --image export/table.png

One loaded bundle (exported with --cache-policy heavy-hitter, so it serves all three policies), one greedy request
per policy with --ignore-eos and max_new_tokens = 10 x the capacity C. Every decode step is timed inside the
runtime (Generator.generate_next_token); marks are the generated-token counts 0.1 C, 0.5 C, C and 10 C, and
the rate at a mark is the tokens/s of the decode steps since the previous mark (from the second token on), so
the 10x figure is the steady state with eviction, the 10% one the start of decoding. `stop` ends with
cache_full once prompt + answer fill the cache: its later marks are null. Also per mark: the process's RSS
(MiB, /proc/self/statm) and the slots evicted so far. Prints one JSON object (with provenance) on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "runtime"))
from edgeprune.provenance import provenance  # noqa: E402

POLICIES = ("stop", "sink-window", "heavy-hitter")
MARKS = (("10%", 0.1), ("50%", 0.5), ("100%", 1.0), ("10x", 10.0))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def measure(bundle, image, prompt: str, policy: str, capacity: int, multiple: float) -> dict:
    """One request under `policy`: {"marks": {mark: {tokens, tokens_per_s, rss_mib, evicted_slots}}, ...}."""
    total = int(multiple * capacity)
    ends = {name: max(2, int(round(f * capacity))) for name, f in MARKS if f <= multiple}
    marks, last_at, last_t, elapsed = {}, 1, 0.0, 0.0
    # stop: max_new_tokens 0 = until the cache is full (a longer request is refused up front)
    with bundle.generator(image, prompt, max_new_tokens=0 if policy == "stop" else total, ignore_eos=True,
                          cache_policy=policy) as gen:
        n = 0
        while not gen.done:
            t = time.perf_counter()
            gen.generate_next_token()
            dt = time.perf_counter() - t
            n += 1
            if n > 1:  # the first token comes from the prefill's logits, not a decode step
                elapsed += dt
            for name, end in ends.items():
                if n == end:
                    marks[name] = {"tokens": n, "tokens_per_s": (n - last_at) / (elapsed - last_t),
                                   "rss_mib": rss_mib(), "evicted_slots": gen.cache_stats["evicted_slots"]}
                    last_at, last_t = n, elapsed
        stop = gen.stop_reason
        prompt_slots = len(gen.prompt_token_ids) - 1 + gen.visual_tokens
    for name in ends:
        marks.setdefault(name, None)  # stop: the cache filled before this mark
    return {"policy": policy, "stop_reason": stop, "tokens": n, "prompt_slots": prompt_slots, "marks": marks,
            "decode_tokens_per_s": (n - 1) / elapsed if n > 1 else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--prompt", default="Describe the picture in detail.")
    ap.add_argument("--multiple", type=float, default=10.0, help="run length in cache capacities (default 10)")
    args = ap.parse_args()

    from edgeprune_runtime import Bundle

    with Bundle(args.bundle) as bundle:
        shapes = bundle.shapes
        sinks = bundle.manifest.get("cache", {}).get("sinks", 4)
        rows = [measure(bundle, args.image, args.prompt, p, shapes.cache_capacity, args.multiple) for p in POLICIES]
    from edgeprune_runtime.cache_policy import eviction_chunk

    report = {"bundle": str(args.bundle), "cache_capacity": shapes.cache_capacity, "sinks": sinks,
              "eviction_chunk": eviction_chunk(shapes.cache_capacity, sinks), "multiple": args.multiple,
              "prompt": args.prompt, "policies": rows, "provenance": provenance()}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
