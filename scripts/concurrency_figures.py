"""Throughput of 1, 2 and 4 concurrent requests on one loaded bundle (one Python process, one Bundle, threads).

    .venv/bin/python scripts/record_result.py docs/results/concurrency-tiny.json -- \\
        .venv/bin/python scripts/concurrency_figures.py export/tiny --image demo/table.png

For each concurrency c, c threads start together (a barrier) and each runs `--requests` greedy requests back to
back (`--max-new-tokens` tokens each, EOS ignored, so every request does the same work), sharing the one Bundle
(sessions and weights); each request has its own KV cache. Reported per c: wall seconds, requests/s, generated
tokens/s over all threads, and the mean time to first token. Every answer must equal the single-threaded
answer (checked), or the figures are not of the same work. `--rounds` rounds per c; the median round is kept.

Prints one JSON object (with provenance) on the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "runtime"))
from edgeprune.provenance import provenance  # noqa: E402

PROMPT = "What is on the table?"


def one_round(bundle, image, c: int, requests: int, max_new_tokens: int, expected) -> dict:
    barrier = threading.Barrier(c + 1)
    results: list = []
    errors: list = []

    def worker():
        barrier.wait()
        try:
            for _ in range(requests):
                results.append(bundle.generate(image, PROMPT, max_new_tokens=max_new_tokens, ignore_eos=True))
        except BaseException as e:  # reported below, where the script fails
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(c)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise SystemExit(f"error: a request failed: {errors[0]}")
    if any(r.token_ids != expected for r in results):
        raise SystemExit("error: a concurrent answer differs from the single-threaded one")
    tokens = sum(len(r.token_ids) for r in results)
    return {"concurrency": c, "requests": len(results), "wall_s": wall, "requests_per_s": len(results) / wall,
            "tokens_per_s": tokens / wall, "mean_ttft_s": statistics.mean(r.ttft_s for r in results)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--concurrency", default="1,2,4", help="comma-separated thread counts (default 1,2,4)")
    ap.add_argument("--requests", type=int, default=4, help="requests per thread per round (default 4)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    from edgeprune_runtime import Bundle

    with Bundle(args.bundle) as bundle:
        expected = bundle.generate(args.image, PROMPT, max_new_tokens=args.max_new_tokens, ignore_eos=True).token_ids
        rows = []
        for c in (int(x) for x in args.concurrency.split(",")):
            rounds = sorted((one_round(bundle, args.image, c, args.requests, args.max_new_tokens, expected)
                             for _ in range(args.rounds)), key=lambda r: r["wall_s"])
            rows.append(rounds[len(rounds) // 2])
            print(json.dumps(rows[-1]), file=sys.stderr)
        manifest = bundle.manifest
    report = {"bundle": str(args.bundle), "model": manifest.get("source", {}).get("model") if isinstance(
        manifest.get("source"), dict) else None, "prompt": PROMPT, "max_new_tokens": args.max_new_tokens,
        "requests_per_thread": args.requests, "rounds": args.rounds, "rows": rows, "provenance": provenance()}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
