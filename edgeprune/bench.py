"""`edgeprune bench`: transformers' full-budget `generate` vs the bundle at a budget, same image and prompt.

Each side runs in its own child process so that its peak resident memory is its own (the
parent, which exports the bundle, holds a copy of the model). The bundle side imports only
`edgeprune_runtime` (no torch), as an application embedding it would.

Timings: ttft_s runs from the PIL image in memory to the first generated token id (image
preprocessing, vision, prefill); decode_tokens_per_s = (generated - 1) / (time after the first).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeprune.errors import EdgePruneError

DEFAULT_PROMPT = "What is on the table?"


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_transformers(model_name: str, model_dir: str | None, layers: int, image_path: str, prompt: str,
                         max_new_tokens: int) -> dict:
    """Runs transformers' greedy `generate` on the full image (no budget). Child-process side."""
    import torch
    from PIL import Image
    from transformers.generation.streamers import BaseStreamer

    from edgeprune import registry

    loaded = registry.get(model_name).loader(model_dir, layers=layers)
    model, processor = loaded.model, loaded.processor
    image = Image.open(image_path).convert("RGB")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self.calls = 0

        def put(self, value):
            self.calls += 1
            if self.calls > 1:  # the first call carries the prompt ids
                self.times.append(time.perf_counter())

        def end(self):
            pass

    clock = Clock()
    torch.set_num_threads(torch.get_num_threads())
    with torch.inference_mode():
        start = time.perf_counter()
        inputs = processor(images=image, text=text, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, streamer=clock)
    generated = out.shape[1] - inputs["input_ids"].shape[1]
    ttft = clock.times[0] - start
    decode = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]) if len(clock.times) > 1 else 0.0
    return {"ttft_s": ttft, "decode_tokens_per_s": decode, "peak_rss_bytes": _peak_rss_bytes(),
            "generated_tokens": int(generated), "prefill_tokens": int(inputs["input_ids"].shape[1]),
            "weights_bytes": loaded.weights_bytes}


def measure_bundle(bundle: str, image_path: str, prompt: str, max_new_tokens: int) -> dict:
    """Runs the bundle with edgeprune_runtime only. Child-process side (no torch imported)."""
    from edgeprune_runtime import Bundle
    from edgeprune_runtime.manifest import load_manifest

    manifest = load_manifest(bundle, verify_hashes=False)
    with Bundle(bundle) as b:
        result = b.generate(image_path, prompt, max_new_tokens=max_new_tokens, ignore_eos=True)
    s = manifest.shapes
    weights = sum((Path(bundle) / manifest.graphs[g]).stat().st_size for g in ("lm_weights",)) + \
        (Path(bundle) / manifest.graphs["vision"]["weights"]).stat().st_size
    cache = 2 * sum(h * s.cache_capacity * s.head_dim * 4 for h in s.kv_heads)
    return {"ttft_s": result.ttft_s, "decode_tokens_per_s": result.decode_tokens_per_s,
            "peak_rss_bytes": _peak_rss_bytes(), "generated_tokens": len(result.token_ids),
            "visual_tokens": result.visual_tokens, "weights_bytes": weights, "cache_bytes": cache}


def _child(args: list[str]) -> dict:
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "edgeprune.bench", *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise EdgePruneError(f"benchmark worker failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bench(model_name: str, budget_recipe, model_dir: str | None, layers: int, image_path: str | None,
              prompt: str, max_new_tokens: int, bundle_dir: str | None, on_stage=lambda s: None) -> dict:
    """Exports (unless `bundle_dir` holds one already), then measures both sides. Returns the report dict."""
    from edgeprune.export import export_bundle
    from edgeprune.sample_image import write_sample_image

    with tempfile.TemporaryDirectory(prefix="edgeprune-bench-") as tmp:
        image = image_path or str(write_sample_image(Path(tmp) / "sample.png"))
        bundle = bundle_dir or str(Path(tmp) / "bundle")
        if not (Path(bundle) / "manifest.json").is_file():
            on_stage(f"export {model_name} at budget {budget_recipe.budget}")
            export_bundle(model_name, bundle, budget_recipe, model_dir=model_dir, model_options={"layers": layers},
                          on_stage=lambda s: on_stage(f"export: {s}"))
        on_stage("transformers generate (full budget)")
        hf = _child(["transformers", model_name, model_dir or "", str(layers), image, prompt, str(max_new_tokens)])
        on_stage(f"edgeprune bundle (budget {budget_recipe.budget})")
        ours = _child(["bundle", bundle, image, prompt, str(max_new_tokens)])
    memory_bound = ours["weights_bytes"] + ours["cache_bytes"]
    ratios = {
        "ttft_speedup": hf["ttft_s"] / ours["ttft_s"],
        "decode_speedup": ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"] if hf["decode_tokens_per_s"] else None,
        "peak_rss_ratio": ours["peak_rss_bytes"] / hf["peak_rss_bytes"],
        "peak_rss_vs_weights_plus_cache": ours["peak_rss_bytes"] / memory_bound,
    }
    return {"model": model_name, "budget": budget_recipe.budget, "max_new_tokens": max_new_tokens,
            "threads": os.cpu_count(), "transformers": hf, "edgeprune": ours, "ratios": ratios}


def _worker(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "transformers":
        name, model_dir, layers, image, prompt, n = argv[1:]
        report = measure_transformers(name, model_dir or None, int(layers), image, prompt, int(n))
    elif kind == "bundle":
        bundle, image, prompt, n = argv[1:]
        report = measure_bundle(bundle, image, prompt, int(n))
    else:
        raise SystemExit(f"unknown worker {kind!r}")
    print(json.dumps(report))


if __name__ == "__main__":
    _worker(sys.argv[1:])
