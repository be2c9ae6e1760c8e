"""Time to first token of a follow-up turn against a fresh request, on one loaded bundle.

    .venv/bin/python scripts/record_result.py docs/results/multiturn-tiny.json -- \\
        .venv/bin/python scripts/multiturn_figures.py export/tiny --image export/table.png

Per round: a conversation about the image (the first question, then each follow-up via Bundle.chat, which
appends the question to the KV cache with one step-graph call), and, for each follow-up question, a fresh
request (image, vision, prefill) asking the same question. Reported: the median over `--rounds` of each
one's time to first token and its parts (image, preprocess, vision, prefill or step), all timed inside the
runtime. Prints one JSON object (with provenance) on the last line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "runtime"))
from edgeprune.provenance import provenance  # noqa: E402

QUESTIONS = ["What is on the table?", "What color is it?", "Is it big?"]
PARTS = ("image_s", "preprocess_s", "vision_s", "prefill_s", "ttft_s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--image", type=Path, required=True)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()

    from edgeprune_runtime import Bundle

    follow, fresh = [], []
    with Bundle(args.bundle) as bundle:
        for _ in range(args.rounds):
            with bundle.chat(args.image) as chat:
                turns = [chat.ask(q, max_new_tokens=args.max_new_tokens, ignore_eos=True) for q in QUESTIONS]
            follow += [t.timings for t in turns[1:]]
            fresh += [bundle.generate(args.image, q, max_new_tokens=args.max_new_tokens, ignore_eos=True).timings
                      for q in QUESTIONS[1:]]
    median = lambda rows: {k: statistics.median(r[k] for r in rows) for k in PARTS}  # noqa: E731
    report = {"bundle": str(args.bundle), "questions": QUESTIONS, "max_new_tokens": args.max_new_tokens,
              "rounds": args.rounds, "follow_up": median(follow), "fresh": median(fresh), "provenance": provenance()}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
