"""What one eviction costs at a model's cache shape: Evictor.make_room on a full host KVCache, no model needed.

    .venv/bin/python scripts/record_result.py docs/results/eviction-cost-7b-shape.json -- \\
        .venv/bin/python scripts/eviction_cost.py --kv-heads 32 --head-dim 128 --layers 2 --capacities 336,960

Per policy and capacity C: a cache of C slots filled with random keys and values, then `--repeats` times: mark
it full again and time `make_room(1)`, which chooses a chunk of max(1, (C - S) // 8) slots (heavy-hitter by
random accumulated masses), moves the survivors left and re-rotates their keys (cache_policy.py). Reported:
the median milliseconds per eviction and per evicted slot (the cost each generated token past the capacity pays,
amortised). Prints one JSON object (with provenance) on the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "runtime"))
from edgeprune.provenance import provenance  # noqa: E402


def one(policy: str, capacity: int, kv_heads: int, head_dim: int, layers: int, sinks: int, repeats: int) -> dict:
    from edgeprune_runtime.cache_policy import CachePolicy, Evictor
    from edgeprune_runtime.kvcache import KVCache

    rng = np.random.default_rng(0)
    cache = KVCache([kv_heads] * layers, capacity, head_dim)
    data = [rng.standard_normal((kv_heads, capacity, head_dim)).astype(np.float32) for _ in range(layers)]
    cache.fill_from_prefill(data, data, np.ones(capacity, np.float32))
    inv_freq = 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)  # Llama's default rotary frequencies
    evictor = Evictor(CachePolicy(policy, sinks, False), cache, inv_freq)
    times = []
    for _ in range(repeats):
        for layer in range(layers):  # full again (the slots' contents do not matter to the cost)
            cache.valid[layer][:] = 1.0
            cache.lengths[layer] = capacity
        cache.position = capacity
        evictor.mass[:] = rng.uniform(0.0, 1.0, capacity)
        t = time.perf_counter()
        evicted = evictor.make_room(1)
        times.append(time.perf_counter() - t)
    ms = 1000 * statistics.median(times)
    return {"policy": policy, "capacity": capacity, "evicted_per_chunk": evicted, "ms_per_eviction": ms,
            "ms_per_evicted_slot": ms / evicted}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv-heads", type=int, default=32)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--capacities", default="336,960", help="comma-separated cache capacities")
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    capacities = [int(c) for c in args.capacities.split(",")]
    rows = [one(p, c, args.kv_heads, args.head_dim, args.layers, args.sinks, args.repeats)
            for c in capacities for p in ("sink-window", "heavy-hitter")]
    print(json.dumps({"kv_heads": args.kv_heads, "head_dim": args.head_dim, "layers": args.layers, "sinks": args.sinks,
                      "repeats": args.repeats, "rows": rows, "provenance": provenance()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
