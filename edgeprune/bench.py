"""`edgeprune bench`: transformers' full-budget `generate` vs the bundle at a budget, same image and prompt.

Each side runs in its own child process so that its peak resident memory is its own (the
parent, which exports the bundle, holds a copy of the model). The bundle side imports only
`edgeprune_runtime` (no torch), as an application embedding it would.

Timings: ttft_s runs from the PIL image in memory to the first generated token id (image
preprocessing, vision, prefill); decode_tokens_per_s = (generated - 1) / (time after the first).

`--backend cuda`: the bundle runs on the runtime's CUDA backend and transformers on the same GPU, in the
bundle's precision (fp32 or fp16: `--precision`), each in its own process; GPU memory is reported as the
bytes in use on the device (bundle side, after generating) and torch's peak allocation (transformers side).
Decode reads every LM weight but the embedding table, plus the whole fixed-size cache, once per token:
`decode_bytes_per_token` and the bandwidth that implies (`decode_gb_per_s`) come with the figures.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edgeprune.errors import EdgePruneError

def _peak_rss_bytes() -> int:
    """This process's peak resident set size.

    VmHWM belongs to the current address space, so a worker started by fork+exec from a big parent
    reports only its own peak; ru_maxrss would inherit the parent's RSS at fork time (Linux).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


BACKENDS = ("cpu", "cuda")
TORCH_DTYPES = {"fp32": "float32", "fp16": "float16"}


def measure_transformers(model_name: str, model_dir: str | None, layers: int, image_path: str, prompt: str,
                         max_new_tokens: int, device: str = "cpu", precision: str = "fp32") -> dict:
    """Runs transformers' greedy `generate` on the full image (no budget) on `device` ("cpu" | "cuda") in
    `precision` (fp32 | fp16). Child-process side."""
    import torch
    from PIL import Image
    from transformers.generation.streamers import BaseStreamer

    from edgeprune import registry

    loaded = registry.get(model_name).loader(model_dir, layers=layers)
    model, processor = loaded.model, loaded.processor
    dtype = getattr(torch, TORCH_DTYPES[precision])
    model = model.to(device=device, dtype=dtype)
    cuda = device == "cuda"
    image = Image.open(image_path).convert("RGB")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)

    class Clock(BaseStreamer):
        def __init__(self):
            self.times: list[float] = []
            self.calls = 0

        def put(self, value):
            if cuda:
                torch.cuda.synchronize()  # the token exists when the GPU has computed it, not when it was queued
            self.calls += 1
            if self.calls > 1:  # the first call carries the prompt ids
                self.times.append(time.perf_counter())

        def end(self):
            pass

    clock = Clock()
    with torch.inference_mode():
        start = time.perf_counter()
        inputs = processor(images=image, text=text, return_tensors="pt")
        inputs = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in inputs.items()}
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, streamer=clock)
    generated = out.shape[1] - inputs["input_ids"].shape[1]
    ttft = clock.times[0] - start
    decode = (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]) if len(clock.times) > 1 else 0.0
    report = {"ttft_s": ttft, "decode_tokens_per_s": decode, "peak_rss_bytes": _peak_rss_bytes(),
              "generated_tokens": int(generated), "prefill_tokens": int(inputs["input_ids"].shape[1]),
              "weights_bytes": loaded.weights_bytes, "device": device, "precision": precision}
    if cuda:
        report |= {"gpu_peak_allocated_bytes": int(torch.cuda.max_memory_allocated()), "gpu": torch.cuda.get_device_name(0)}
    return report


def measure_bundle(bundle: str, image_path: str, prompt: str, max_new_tokens: int, backend: str = "cpu") -> dict:
    """Runs the bundle with edgeprune_runtime only, on `backend`. Child-process side (no torch imported)."""
    from edgeprune_runtime import Bundle
    from edgeprune_runtime.manifest import load_manifest

    manifest = load_manifest(bundle, verify_hashes=False)
    with Bundle(bundle, verify_hashes=False, backend=backend) as b:  # just exported and checked; hashing GBs is not the benchmark
        result = b.generate(image_path, prompt, max_new_tokens=max_new_tokens, ignore_eos=True)
        gpu_bytes = None
        if backend == "cuda":
            from edgeprune_runtime.backends.device import gpu_memory_used

            gpu_bytes = gpu_memory_used()  # sessions, weights and this request's cache still held
    s = manifest.shapes
    lm_weights = manifest.path(manifest.graphs["lm_weights"]).stat().st_size
    weights = lm_weights + manifest.path(manifest.graphs["vision"]["weights"]).stat().st_size
    itemsize = 2 if manifest.data.get("onnx", {}).get("precision") == "fp16" else 4
    cache = 2 * sum(h * s.cache_slots_at(i) * s.head_dim * itemsize for i, h in enumerate(s.kv_heads))
    index = json.loads(manifest.path(manifest.graphs["lm_weights"] + ".json").read_text())["tensors"]
    embedding = sum(t["length"] for t in index if "embed_tokens" in t["name"])  # one row of it is read per token
    per_token = lm_weights - embedding + cache
    report = {"ttft_s": result.ttft_s, "decode_tokens_per_s": result.decode_tokens_per_s,
              "peak_rss_bytes": _peak_rss_bytes(), "generated_tokens": len(result.token_ids),
              "visual_tokens": result.visual_tokens, "weights_bytes": weights, "cache_bytes": cache,
              "prefill_slots": s.prefill_slots, "visual_slots": s.visual_slots, "cache_slots": s.cache_capacity,
              "lm_layers": s.num_layers, "kv_heads": list(s.kv_heads), "layer_visual_slots": list(s.layer_visual_slots),
              "timings": dict(result.timings), "backend": result.backend, "token_ids": list(result.token_ids),
              "decode_bytes_per_token": per_token,
              "decode_gb_per_s": per_token * result.decode_tokens_per_s / 1e9 if result.decode_tokens_per_s else None}
    if gpu_bytes is not None:
        report["gpu_memory_used_bytes"] = gpu_bytes
    return report


def _child(args: list[str]) -> dict:
    """Runs one measurement worker (`python -m edgeprune.bench ...`) and returns its JSON report."""
    proc = subprocess.run([sys.executable, "-m", "edgeprune.bench", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
        raise EdgePruneError(f"benchmark worker failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def check_backend(backend: str, precision: str) -> None:
    """Refuses, before any export, a bench backend that cannot run here (RuntimeStatusError / MissingDependencyError)."""
    from edgeprune.errors import ConfigError, MissingDependencyError

    if backend not in BACKENDS:
        raise ConfigError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "cpu":
        return
    from edgeprune_runtime.backends.select import cuda_device

    cuda_device()  # onnxruntime-gpu and a GPU, or the runtime's one-line refusal
    if precision not in TORCH_DTYPES:
        raise ConfigError(f"bench --backend cuda compares {' and '.join(TORCH_DTYPES)} bundles with transformers in "
                          f"the same precision; {precision} is a CPU quantization (use --precision fp32 or fp16)")
    import torch

    if not torch.cuda.is_available():
        raise MissingDependencyError("bench --backend cuda runs transformers on the same GPU, but this torch has no CUDA; "
                                     "install a CUDA build of torch (https://pytorch.org/get-started/locally/)")


def run_bench(model_name: str, budget_recipe, model_dir: str | None, layers: int, image_path: str | None,
              prompt: str, max_new_tokens: int, bundle_dir: str | None, on_stage=lambda s: None,
              backend: str = "cpu") -> dict:
    """Exports the bundle (or uses `bundle_dir`, which must hold one of `model_name`), then measures both
    sides on `backend` ("cpu", or "cuda": the runtime's CUDA backend and transformers on the same GPU).
    Returns the report dict. Raises EdgePruneError / RuntimeStatusError for bad inputs up front."""
    from edgeprune.errors import ConfigError
    from edgeprune.export import export_bundle
    from edgeprune.sample_image import write_sample_image
    from edgeprune_runtime.manifest import load_manifest
    from edgeprune_runtime.preprocess import load_image

    if max_new_tokens < 2:
        raise ConfigError("--max-new-tokens must be at least 2 to time decoding")
    if image_path:
        load_image(image_path)  # a bad image fails now, not after a long export
    budget = budget_recipe.budget
    if bundle_dir:
        manifest = load_manifest(bundle_dir, verify_hashes=False)
        if manifest.data["source"]["model"] != model_name:
            raise ConfigError(f"--bundle {bundle_dir} was exported from {manifest.data['source']['model']!r}, "
                              f"not {model_name!r}")
        budget = manifest.data["recipe"]["budget"]
        strategy = manifest.data["recipe"].get("strategy")
        precision = manifest.data.get("onnx", {}).get("precision", "fp32")
        vision_keep = manifest.data["recipe"].get("vision_keep", "")
        rewrites = manifest.data["recipe"].get("rewrites", {})
    else:
        strategy, precision = budget_recipe.strategy, budget_recipe.onnx.precision
        vision_keep = budget_recipe.vision_keep
        rewrites = dataclasses.asdict(budget_recipe.rewrites)
    check_backend(backend, precision)
    with tempfile.TemporaryDirectory(prefix="edgeprune-bench-") as tmp:
        image = image_path or str(write_sample_image(Path(tmp) / "sample.png"))
        bundle = bundle_dir or str(Path(tmp) / "bundle")
        if not bundle_dir:
            on_stage(f"export {model_name} at budget {budget}")
            export_bundle(model_name, bundle, budget_recipe, model_dir=model_dir, model_options={"layers": layers},
                          on_stage=lambda s: on_stage(f"export: {s}"))
        on_stage("transformers generate (full budget)")
        hf_precision = precision if backend == "cuda" else "fp32"  # on the CPU transformers runs as it loads (fp32)
        hf = _child(["transformers", model_name, model_dir or "", str(layers), image, prompt, str(max_new_tokens),
                     backend, hf_precision])
        on_stage(f"edgeprune bundle (budget {budget}, {backend} backend)")
        ours = _child(["bundle", bundle, image, prompt, str(max_new_tokens), backend])
    ratios = {
        "ttft_speedup": _ratio(hf["ttft_s"], ours["ttft_s"]),
        "decode_speedup": _ratio(ours["decode_tokens_per_s"], hf["decode_tokens_per_s"]),
        "peak_rss_ratio": _ratio(ours["peak_rss_bytes"], hf["peak_rss_bytes"]),
        "peak_rss_vs_weights_plus_cache": _ratio(ours["peak_rss_bytes"], ours["weights_bytes"] + ours["cache_bytes"]),
    }
    from edgeprune.provenance import provenance

    return {"model": model_name, "budget": budget, "strategy": strategy, "precision": precision,
            "vision_keep": vision_keep, "max_new_tokens": max_new_tokens, "backend": backend,
            # the recipe's [rewrites] keys that are on (the stats file's path says nothing about the bundle)
            "rewrites": {k: v for k, v in rewrites.items() if v and k not in ("stats", "head_criterion")},
            "threads": os.cpu_count(), "transformers": hf, "edgeprune": ours, "ratios": ratios,
            "provenance": provenance()}


def _worker(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "transformers":
        name, model_dir, layers, image, prompt, n, *where = argv[1:]  # where: [device, precision], or CPU fp32
        report = measure_transformers(name, model_dir or None, int(layers), image, prompt, int(n), *where)
    elif kind == "bundle":
        bundle, image, prompt, n, *backend = argv[1:]  # backend: [name], or cpu (sweep.py's calls)
        report = measure_bundle(bundle, image, prompt, int(n), *backend)
    else:
        raise SystemExit(f"unknown worker {kind!r}")
    print(json.dumps(report))


if __name__ == "__main__":
    _worker(sys.argv[1:])


def _no_selection(model, layers: int | None = None):
    """The vision graph without selection, as transformers computes it: CLIP up to the feature layer (or its
    last `layers`) and the projector on every patch -> LM-ready embeddings [P, N, D]."""
    import torch

    from edgeprune.graphs import feature_layer_count

    class NoSelection(torch.nn.Module):
        def __init__(self):
            super().__init__()
            tower = model.model.vision_tower
            self.embeddings, self.pre = tower.embeddings, tower.pre_layrnorm
            self.projector = model.model.multi_modal_projector
            kept = tower.encoder.layers[: feature_layer_count(model.config)]
            self.layers = torch.nn.ModuleList(kept[-layers:] if layers else kept)

        def forward(self, pixel_values):
            h = self.pre(self.embeddings(pixel_values))
            for layer in self.layers:
                h = layer(h, None)
            return self.projector(h[:, 1:])

    return NoSelection().eval()


def _median_seconds(session, feeds: dict, repeats: int) -> float:
    import statistics

    session.run(None, feeds)  # warm-up: allocations, kernel choice
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def selection_cost(model_name: str, base_recipe, strategies: list[str], model_dir: str | None, layers: int,
                   image_path: str | None, repeats: int = 3, short_repeats: int = 15,
                   on_stage=lambda s: None) -> dict:
    """What token selection adds to the vision graph, per strategy (ONNX Runtime, one image).

    The baseline is the graph without selection (`_no_selection`: tower + projector on all patches).
    Timing two full vision graphs (~10 s each on CPU for CLIP-L) and subtracting drowns tens of
    milliseconds in run-to-run noise, so the difference is taken on the same graphs cut to ONE CLIP
    layer (the feature layer, whose attention the strategies score), timed many times:
        overhead = (t_strategy_1layer - t_baseline_1layer) / t_baseline_full.
    It covers scoring, ranking, TopK and the sort, minus the projector work saved on dropped tokens
    (so it can be negative).
    """
    import onnxruntime as ort
    import torch
    from torch import nn

    from edgeprune import registry
    from edgeprune.graphs import VISION_OUTPUTS, VisionGraph
    from edgeprune.onnx_export import export_module
    from edgeprune.plan import plan_shapes
    from edgeprune.sample_image import make_sample_image
    from edgeprune_runtime.layout import layout_for
    from edgeprune_runtime.preprocess import PreprocessParams, load_image, preprocess

    on_stage(f"load {model_name}")
    loaded = registry.get(model_name).loader(model_dir, layers=layers)
    recipes = {s: base_recipe.override(strategy=s) for s in strategies}
    shapes = {s: plan_shapes(loaded.config, loaded.processor.image_processor, r) for s, r in recipes.items()}
    any_shapes = next(iter(shapes.values()))
    params = PreprocessParams.from_processor_dict(loaded.processor.image_processor.to_dict(), any_shapes.partitions)
    image = load_image(image_path) if image_path else make_sample_image()
    pixel_values, hw = preprocess(image, params)
    from edgeprune.provenance import provenance

    report = {"model": model_name, "budget": base_recipe.budget, "image_hw": list(hw), "repeats": repeats,
              "short_repeats": short_repeats, "strategies": {}, "provenance": provenance()}

    def timed(module, inputs: dict, names: list[str], outputs: list[str], path: Path, n: int) -> float:
        export_module(module, tuple(torch.from_numpy(inputs[k]) for k in names), names, outputs, path,
                      base_recipe.onnx.opset)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return _median_seconds(session, {i.name: inputs[i.name] for i in session.get_inputs()}, n)

    with tempfile.TemporaryDirectory(prefix="edgeprune-selcost-") as tmp:
        tmp = Path(tmp)
        feeds = {"pixel_values": pixel_values}
        on_stage("time the vision graph without selection")
        report["no_selection_s"] = timed(_no_selection(loaded.model), feeds, ["pixel_values"], ["embeds"],
                                         tmp / "base" / "g.onnx", repeats)
        report["no_selection_1layer_s"] = timed(_no_selection(loaded.model, 1), feeds, ["pixel_values"], ["embeds"],
                                                tmp / "base1" / "g.onnx", short_repeats)
        for name, recipe in recipes.items():
            s = shapes[name]
            layout = layout_for(hw, params.image_grid_pinpoints, s)
            graph = VisionGraph(loaded.model, s, recipe).eval()
            graph.layers = nn.ModuleList(graph.layers[-1:])  # the feature layer only
            on_stage(f"time {name}")
            t = timed(graph, {**feeds, **layout.feeds()}, list(graph.input_names), list(VISION_OUTPUTS),
                      tmp / name / "g.onnx", short_repeats)
            extra = t - report["no_selection_1layer_s"]
            report["strategies"][name] = {"vision_1layer_s": t, "selection_s": extra,
                                          "overhead": extra / report["no_selection_s"]}
    return report
