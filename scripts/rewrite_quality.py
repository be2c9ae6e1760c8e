"""Print (one JSON line) how far each rewrite moves a model's output: KL and greedy agreement over 20 requests.

    .venv/bin/python scripts/record_result.py docs/results/rewrites-quality-tiny.json -- \\
        .venv/bin/python scripts/rewrite_quality.py llava-next-tiny
    .venv/bin/python scripts/rewrite_quality.py llava-next --model DIR --stats stats.json   # a real checkpoint

Variants: 25% and 50% of LM KV groups pruned (output-norm), 50% with the pruned heads folded into the bias,
one LM layer skipped (least influential), 25% of the vision heads pruned; visual tokens dropped after LM layer
L = min(1, layers - 2) to 64 (FastV) or to none (YOPO); SkipDecode skipping the lowest layer from the third
decode step on. Scores come from --stats or a calibration on the built-in samples (edgeprune/calibrate.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "runtime")]


def main() -> int:
    from edgeprune import registry
    from edgeprune.calibrate import builtin_samples, calibrate, write_stats
    from edgeprune.errors import EdgePruneError
    from edgeprune.provenance import provenance
    from edgeprune.recipe import RewritesRecipe
    from edgeprune.rewrites.quality import quality_samples, rewrite_quality

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--model", dest="model_dir")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--stats", help="calibration stats [default: calibrate on the built-in samples]")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    try:
        loaded = registry.get(args.name).loader(args.model_dir, layers=args.layers)
        stats = args.stats
        if stats is None:
            import tempfile

            stats = str(Path(tempfile.mkdtemp()) / "stats.json")
            write_stats(calibrate(loaded, builtin_samples()), stats)
        variants = {
            "lm-heads-25%": RewritesRecipe(prune_heads=0.25, stats=stats),
            "lm-heads-50%": RewritesRecipe(prune_heads=0.5, stats=stats),
            "lm-heads-50%-folded": RewritesRecipe(prune_heads=0.5, fold_pruned_heads=True, stats=stats),
            "lm-skip-1-layer": RewritesRecipe(skip_layers=1, stats=stats),
            "vision-heads-25%": RewritesRecipe(prune_vision_heads=0.25, stats=stats),
        }
        drop_layer = min(1, loaded.model.config.text_config.num_hidden_layers - 2)
        variants |= {
            f"drop-visual-after-{drop_layer}:64": RewritesRecipe(drop_visual_after=f"{drop_layer}:64"),
            f"drop-visual-after-{drop_layer}:0 (YOPO)": RewritesRecipe(drop_visual_after=f"{drop_layer}:0"),
            "skip-decode-2:1": RewritesRecipe(skip_decode="2:1"),
        }
        report = rewrite_quality(loaded, variants, quality_samples(), steps=args.steps)
    except EdgePruneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report["model"] = args.name
    report["provenance"] = provenance()
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
