"""The fidelity cost of a bundle's choices against a reference bundle: logit cosine and greedy agreement.

    .venv/bin/python scripts/record_result.py docs/results/fidelity-7b-shape-fast.json -- \\
        .venv/bin/python scripts/bundle_drift.py export/fast7b export/fp32-7b --max-new-tokens 16

Both bundles answer the same requests (the built-in sample image at the sizes below, the sample prompt)
greedily in lock step (edgeprune/drift.py): per request the logit cosine at each position up to the first
different token and the number of leading tokens that agree. Prints one JSON object with provenance.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

IMAGE_SIZES = ((640, 480), (360, 720), (800, 800))  # three crop grids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="the bundle whose drift is measured")
    ap.add_argument("reference", help="the reference bundle (fp32, no vision pruning)")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args(argv)

    from edgeprune.drift import bundle_drift
    from edgeprune.errors import EdgePruneError
    from edgeprune.provenance import provenance
    from edgeprune.sample_image import SAMPLE_PROMPT, write_sample_image
    from edgeprune_runtime.errors import RuntimeStatusError
    from edgeprune_runtime.manifest import load_manifest

    if args.max_new_tokens < 1:
        print("error: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    try:
        described = {}
        for what, path in (("bundle", args.bundle), ("reference", args.reference)):
            m = load_manifest(path, verify_hashes=False)
            described[what] = {"path": path, "source": m.data["source"]["model"],
                               "precision": m.data.get("onnx", {}).get("precision", "fp32"),
                               "vision_keep": m.data["recipe"].get("vision_keep", ""),
                               "budget": m.data["recipe"]["budget"], "strategy": m.data["recipe"].get("strategy")}
        if described["bundle"]["source"] != described["reference"]["source"]:
            print("error: the two bundles come from different source models; export both from the same one", file=sys.stderr)
            return 2
        requests = []
        with tempfile.TemporaryDirectory() as tmp:
            for width, height in IMAGE_SIZES:
                image = str(write_sample_image(Path(tmp) / f"sample-{width}x{height}.png", width, height))
                drift = bundle_drift(args.bundle, args.reference, image, SAMPLE_PROMPT, args.max_new_tokens)
                requests.append({"image": f"sample {width}x{height}", **drift.to_dict()})
    except (EdgePruneError, RuntimeStatusError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tokens = sum(r["tokens"] for r in requests)
    report = {**described, "prompt": SAMPLE_PROMPT, "max_new_tokens": args.max_new_tokens, "requests": requests,
              "logit_cosine_min": min(r["logit_cosine_min"] for r in requests),
              "greedy_agreement": sum(r["agreed"] for r in requests) / tokens if tokens else 1.0,
              "provenance": provenance()}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
