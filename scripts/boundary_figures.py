"""Exact prompt boundaries against plain tokenization and token healing: the next byte after prompts that end
mid-word or with a trailing space.

    .venv/bin/python scripts/record_result.py docs/results/boundary-tiny.json -- \\
        .venv/bin/python scripts/boundary_figures.py export/tiny --image export/table.png

For each prompt (raw, ending in the middle of a word or with a space), three next-byte distributions over the
same head (the text before the prompt's last pre-token, in the KV cache):
  exact    the byte-level marginal over every tokenization of the last pre-token (byteprobs.py, the seed's method);
  naive    the last pre-token in its canonical tokenization, then the next token's first byte (plain generation);
  healing  token healing: the last canonical token backed up, the next token constrained to start with it.
Reported per prompt: total variation distance of naive and healing from exact, whether their most likely byte is
exact's, and the step-graph calls and seconds the exact distribution took. Prints one JSON object (with
provenance) on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "runtime"))
from edgeprune.provenance import provenance  # noqa: E402

HEAD = "USER: <image>\n"
ENDINGS = ["The cat sits on the ta", "The cat sits on the ", "The robot arm holds a bl", "There are three peo",
           "What color is the c", "Yes, a brown dog is lying on the gra", "The ball is under the ch",
           "The car is white and parked near the gre"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("--image", type=Path, required=True)
    args = ap.parse_args()

    from edgeprune_runtime.byteprobs import naive_next_byte_probs, token_healing_next_byte_probs
    from edgeprune_runtime.generator import Generator, GeneratorParams, LoadedBundle

    bundle = LoadedBundle(args.bundle)
    tok = bundle.tokenizer.tokenizer
    rows = []
    for ending in ENDINGS:
        gen = Generator(bundle, GeneratorParams(exact_boundary=True), args.image, HEAD + ending, raw_prompt=True)
        t0 = time.perf_counter()
        exact = gen.next_byte_probs()
        seconds = time.perf_counter() - t0
        model = gen._byte_model
        calls = model.calls
        tail_ids = tuple(tok.encode(gen.tail, add_special_tokens=False).ids)
        naive = naive_next_byte_probs(model, tail_ids)
        healing = token_healing_next_byte_probs(model, tail_ids)
        top = int(np.argmax(exact))
        rows.append({
            "prompt_end": ending[-12:], "tail": gen.tail, "tail_tokens": [tok.id_to_token(i) for i in tail_ids],
            "exact_top_byte": chr(top), "exact_top_p": float(exact[top]),
            "naive_tv": 0.5 * float(np.abs(naive - exact).sum()), "naive_top_is_exact": int(np.argmax(naive)) == top,
            "healing_tv": 0.5 * float(np.abs(healing - exact).sum()), "healing_top_is_exact": int(np.argmax(healing)) == top,
            "exact_step_calls": calls, "exact_s": seconds,
        })
        print(json.dumps(rows[-1]), file=sys.stderr)
    report = {"bundle": str(args.bundle), "head": HEAD, "rows": rows,
              "mean_naive_tv": float(np.mean([r["naive_tv"] for r in rows])),
              "mean_healing_tv": float(np.mean([r["healing_tv"] for r in rows])), "provenance": provenance()}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
