"""`edgeprune compare`: every stage of a bundle against the eager PyTorch graphs, with Polygraphy.

The reference is the bundle's own source model (rebuilt through the registry and checked
against the manifest's weight hash) wrapped in the same graph modules that were exported, so a
difference isolates the ONNX export / backend, stage by stage:

    vision   pixels + layout           -> visual_embeds, visual_valid, visual_source
    prefill  text + ONNX vision output -> logits, key_l, value_l
    decode   first token + ONNX cache  -> logits, new_key_l, new_value_l

Each later stage is fed the ONNX outputs of the earlier one on both sides, so errors do not
compound and each row says where a difference arises.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeprune import registry
from edgeprune.errors import ConfigError
from edgeprune.sample_image import SAMPLE_PROMPT



@dataclass
class OutputDiff:
    stage: str
    output: str
    max_absdiff: float
    max_reldiff: float
    passed: bool
    cosine: float = 1.0  # cosine similarity of the flattened outputs (the drift a quantized bundle is judged by)


@dataclass
class CompareReport:
    rows: list[OutputDiff]
    atol: float
    rtol: float
    skipped: list[str] = field(default_factory=list)  # backends not compared, with the reason
    precision: str = "fp32"
    cosine_floor: float | None = None  # set for quantized bundles: rows pass on cosine (COSINE_FLOORS)

    def __bool__(self) -> bool:
        return all(r.passed for r in self.rows)

    def to_dict(self) -> dict:
        return {"passed": bool(self), "atol": self.atol, "rtol": self.rtol, "outputs": [r.__dict__ for r in self.rows],
                "skipped": self.skipped, "precision": self.precision, "cosine_floor": self.cosine_floor}


def _torch_runner(module, input_names: list[str], output_names: list[str], name: str, feed: dict):
    """A Polygraphy runner around a torch module (Polygraphy's PytRunner is unusable on CPU).

    Polygraphy passes a runner only the inputs its metadata declares, so `feed` fixes them."""
    import torch
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class TorchGraphRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name, prefix="torch")
            self._meta = TensorMetadata()
            for n in input_names:
                self._meta.add(n, feed[n].dtype, feed[n].shape)

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            return self._meta

        def infer_impl(self, feed_dict):
            start = time.perf_counter()
            with torch.no_grad():
                outs = module(*[torch.from_numpy(np.ascontiguousarray(feed_dict[n])) for n in input_names])
            self.inference_time = time.perf_counter() - start
            return OrderedDict((n, np.ascontiguousarray(o.numpy())) for n, o in zip(output_names, outs))

    return TorchGraphRunner()


@dataclass
class StageOptions:
    atol: float
    rtol: float
    save_dir: Path | None = None  # write <stage>.inputs.json / <stage>.outputs.json in Polygraphy's format
    engine_runner: object = None  # stage -> a Polygraphy runner of the stage's TensorRT engine, or None
    cosine_floor: float | None = None  # quantized bundles: outputs pass on cosine similarity, not atol/rtol


# Quantized precisions are judged by drift, not elementwise tolerances: each float output's cosine similarity
# with eager fp32 PyTorch must reach this floor (measured on the tiny twin, README "Speed"). Integer outputs
# (visual_source) are compared on the slots both sides keep valid.
COSINE_FLOORS = {"int8": 0.98, "int4": 0.95}


def cosine(a, b) -> float:
    """Cosine similarity of two arrays, flattened in float64; 1.0 when both are all zeros."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    return float(a @ b / (na * nb)) if na and nb else 0.0


def _drift_ok(output: str, cos: float, floor: float, ref, got) -> bool:
    if output in ("visual_valid", "visual_source"):  # the kept set: exact count, sources may differ
        return output != "visual_valid" or int(np.sum(ref)) == int(np.sum(got))
    return cos >= floor


def _compare_stage(stage: str, torch_runner, onnx_path: Path, feed: dict, opts: StageOptions):
    """Runs the torch reference, ONNX Runtime (and the stage's engine, if any) on `feed`; compares each
    backend with the reference. Returns (rows, onnx outputs)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, CompareFunc, RunResults
    from polygraphy.json import save_json
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR  # its per-inference INFO lines would bury the table

    runners = [torch_runner, OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"]),
                                          name=f"onnxrt-{stage}")]
    engine = opts.engine_runner(stage) if opts.engine_runner else None
    if engine is not None:
        runners.append(engine)
    results = Comparator.run(runners, data_loader=[feed], warm_up=0, save_inputs_path=None)
    if opts.save_dir is not None:
        # `polygraphy run <graph> --onnxrt --load-inputs X.inputs.json --load-outputs X.outputs.json` re-checks it
        save_json([feed], str(opts.save_dir / f"{stage}.inputs.json"))
        RunResults([results[0]]).save(str(opts.save_dir / f"{stage}.outputs.json"))
    accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=opts.atol, rtol=opts.rtol),
                                           fail_fast=False, comparisons=[(0, i) for i in range(1, len(runners))])
    rows = []
    outputs = {runner: dict(its[0]) for runner, its in results}
    reference = outputs[results[0][0]]
    for (_, backend), iterations in accuracy[0].items():  # one compare func; (reference, backend) pairs
        label = stage if backend.startswith("onnxrt") else f"{stage} (trt)"
        for output, res in iterations[0].items():
            cos = cosine(reference[output], outputs[backend][output])
            passed = bool(res) if opts.cosine_floor is None else _drift_ok(output, cos, opts.cosine_floor,
                                                                               reference[output], outputs[backend][output])
            rows.append(OutputDiff(label, output, float(res.max_absdiff), float(res.max_reldiff), passed, cos))
    onnx_out = dict(results[1][1][0])
    return rows, onnx_out


def compare_bundle(bundle_dir: str | Path, image_path: str, prompt: str = SAMPLE_PROMPT, raw_prompt: bool = False,
                   atol: float = 1e-4, rtol: float = 1e-3, model_dir: str | None = None,
                   save_dir: str | Path | None = None, trt_target: str | None = None) -> CompareReport:
    """Compares the bundle's ONNX graphs (and, with `trt_target`, its engines for that target) with eager
    PyTorch stage by stage. `save_dir` receives each stage's inputs and reference outputs as Polygraphy JSON.

    Raises EdgePruneError / RuntimeStatusError for a bad bundle, image or prompt, a source model that is
    not the one exported, or engines that are missing or cannot run here (the message says why)."""
    from edgeprune.graphs import VISION_OUTPUTS, DecodeGraph, PrefillGraph, StepGraph, VisionGraph
    from edgeprune.recipe import recipe_from_dict
    from edgeprune_runtime.generator import LoadedBundle
    from edgeprune_runtime.kvcache import KVCache, prefill_slot_valid
    from edgeprune_runtime.layout import layout_for
    from edgeprune_runtime.manifest import per_layer_validity
    from edgeprune_runtime.preprocess import load_image, preprocess
    from edgeprune_runtime.tokenize import text_slots

    bundle = LoadedBundle(bundle_dir, with_engine=False)  # Polygraphy opens its own sessions below
    m, s = bundle.manifest, bundle.shapes
    source = m.data["source"]
    entry = registry.get(source["model"])
    path = model_dir or (source["path"] if entry.checkpoint else None)
    loaded = entry.loader(path, **source.get("options", {}))
    if loaded.weights_sha256 != source["weights_sha256"]:
        raise ConfigError(f"the model at {path or source['model']} is not the one this bundle was exported from "
                          "(weights hash differs); pass --model with the source checkpoint")
    recipe = recipe_from_dict(m.data["recipe"], f"{m.root}/manifest.json recipe")
    _rewrite_like_bundle(loaded.model, m)
    engines, skipped = _engine_runners(m, trt_target) if trt_target else (None, None)
    opts = StageOptions(atol, rtol, Path(save_dir) if save_dir else None, engines,
                        cosine_floor=COSINE_FLOORS.get(m.data.get("onnx", {}).get("precision", "fp32")))
    if opts.save_dir is not None:
        opts.save_dir.mkdir(parents=True, exist_ok=True)

    pixel_values, image_hw = preprocess(load_image(image_path), bundle.preprocess_params)
    pp = bundle.preprocess_params
    layout = layout_for(image_hw, pp.image_grid_pinpoints, s)
    vision = VisionGraph(loaded.model, s, recipe).eval()
    feed = {"pixel_values": pixel_values, **layout.feeds()}
    feed = {n: feed[n] for n in vision.input_names}
    rows, v_out = _compare_stage("vision", _torch_runner(vision, list(vision.input_names), list(VISION_OUTPUTS),
                                                         "torch-vision", feed),
                                 m.path(m.graphs["vision"]["file"]), feed, opts)

    tok = bundle.tokenizer
    before, after = tok.encode_prompt(tok.prompt_text(prompt, bundle.prompt_template, raw_prompt))
    t1, t2 = s.text_slots_before_image, s.text_slots_after_image
    text_ids, text_valid = text_slots(before, after, t1, t2)
    feed = {"text_ids": text_ids, "text_valid": text_valid, "visual_embeds": v_out["visual_embeds"],
            "visual_valid": v_out["visual_valid"]}
    prefill = PrefillGraph(loaded.model, s).eval()
    more, p_out = _compare_stage("prefill", _torch_runner(prefill, list(prefill.input_names), list(prefill.output_names),
                                                          "torch-prefill", feed),
                                 m.path(m.graphs["prefill"]["file"]), feed, opts)
    rows += more

    # The cache as the runtime fills it from the ONNX prefill outputs, then the first generated token
    # through every decode graph (SkipDecode's run fewer layers over the same cache).
    layers = range(s.num_layers)
    cache = KVCache(s.kv_heads, [s.cache_slots_at(i) for i in layers], s.head_dim)
    full = prefill_slot_valid(text_valid, v_out["visual_valid"], t1)
    n = cache.fill_from_prefill([p_out[f"key_{i}"] for i in layers], [p_out[f"value_{i}"] for i in layers],
                                [p_out.get(f"slot_valid_{i}", full) for i in layers])
    schedule = m.skip_decode
    per_layer = per_layer_validity(s, schedule)
    cache_feed = {"cache_valid": cache.valid[0], **{f"cache_valid_{i}": cache.valid[i] for i in layers}}
    for i in layers:
        cache_feed[f"past_key_{i}"], cache_feed[f"past_value_{i}"] = cache.keys[i], cache.values[i]
    token = {"token_id": np.array([int(np.argmax(p_out["logits"]))], np.int64), "position": np.array([n], np.int64)}
    attn_mass = m.cache.attn_mass  # heavy-hitter bundles: the decode and step graphs output attn_mass too
    for skip in schedule.skips:
        decode = DecodeGraph(loaded.model, s, per_layer, skip, attn_mass=attn_mass and not skip).eval()
        feed = {name: {**token, **cache_feed}[name] for name in decode.input_names}
        stage = "decode" if not skip else f"decode-skip{skip}"
        path = m.graphs["decode"]["file"] if not skip else m.graphs["decode_skip"][str(skip)]["file"]
        more, _ = _compare_stage(stage, _torch_runner(decode, list(decode.input_names), list(decode.output_names),
                                                      f"torch-{stage}", feed), m.path(path), feed, opts)
        rows += more

    if "step" in m.graphs:  # the TensorRT LM's graph, as a prefill: the same request in T = S slots
        v = s.visual_slots
        feed = {"token_ids": np.concatenate([text_ids[:t1], np.zeros(v, np.int64), text_ids[t1:]]),
                "visual_embeds": np.concatenate([np.zeros((t1, s.hidden_size), np.float32), v_out["visual_embeds"],
                                                 np.zeros((t2, s.hidden_size), np.float32)]),
                "is_visual": np.concatenate([np.zeros(t1), np.ones(v), np.zeros(t2)]).astype(np.float32),
                "slot_valid": prefill_slot_valid(text_valid, v_out["visual_valid"], t1),
                "position": np.zeros(1, np.int64), "cache_valid": np.zeros(s.cache_capacity, np.float32)}
        for i, h in enumerate(s.kv_heads):
            feed[f"cache_valid_{i}"] = np.zeros(s.cache_slots_at(i), np.float32)
            for kind in ("key", "value"):
                feed[f"past_{kind}_{i}"] = np.zeros((h, s.cache_slots_at(i), s.head_dim), np.float32)
        step = StepGraph(loaded.model, s, per_layer, attn_mass=attn_mass).eval()
        feed = {name: feed[name] for name in step.input_names}
        more, _ = _compare_stage("step", _torch_runner(step, list(step.input_names), list(step.output_names),
                                                       "torch-step", feed),
                                 m.path(m.graphs["step"]["file"]), feed, opts)
        rows += more
    return CompareReport(rows, atol, rtol, [skipped] if skipped else [], m.data.get("onnx", {}).get("precision", "fp32"),
                         opts.cosine_floor)


def _rewrite_like_bundle(model, manifest) -> None:
    """Applies the manifest's recorded rewrites (`layers.lm`) to the freshly loaded source model, so the
    reference is the model that was exported. Bundles from before rewrites existed have no record."""
    rows = manifest.data.get("layers", {}).get("lm") if isinstance(manifest.data.get("layers"), dict) else None
    if rows is None:
        return
    from edgeprune.rewrites import lm_kv_heads
    from edgeprune.rewrites.plan import apply_record, apply_vision_record, record_from_dicts, vision_record_from_dicts

    where = f"{manifest.root}/manifest.json"
    if "vision" in manifest.data["layers"]:
        apply_vision_record(model, vision_record_from_dicts(manifest.data["layers"]["vision"], where))
    apply_record(model, record_from_dicts(rows, where))
    if lm_kv_heads(model) != tuple(manifest.shapes.kv_heads):
        raise ConfigError(f"{manifest.root}/manifest.json: layers.lm does not match shapes.kv_heads; re-export the bundle")


# stage -> (engine name, optimization profile): prefill/decode run on the LM engine's profiles via the step graph
_ENGINE_OF_STAGE = {"vision": ("vision", 0), "step": ("lm", 0)}


def _engine_runners(manifest, target_name: str):
    """(stage -> Polygraphy runner of the bundle's engine for `target_name` or None, None), or (None, why
    they cannot run on this machine: no TensorRT, no GPU, another compute capability).

    ConfigError when the bundle has no engines for the target."""
    from edgeprune.trt.library import import_library
    from edgeprune.trt.runner import engine_runnable, engine_runner
    from edgeprune.trt.targets import get_target

    target = get_target(target_name)
    entry = manifest.data.get("engines", {}).get(target_name)
    if not entry:
        raise ConfigError(f"{manifest.root} has no engines for {target_name}; run `edgeprune build {manifest.root} "
                          f"--target {target_name}` first")
    runnable, why = engine_runnable(target)
    if not runnable:
        return None, f"{target_name} engines not compared: {why}"
    trt = import_library(target)

    def runner(stage: str):
        if stage not in _ENGINE_OF_STAGE:
            return None
        name, profile = _ENGINE_OF_STAGE[stage]
        return engine_runner(trt, manifest.path(entry["engines"][name]["file"]).read_bytes(), f"trt-{stage}", profile)

    return runner, None


def engines_target(bundle_dir: str | Path, target_name: str | None) -> str:
    """The target whose engines `compare --backends trt` uses: the given one, or the bundle's only one."""
    from edgeprune_runtime.manifest import load_manifest

    built = list(load_manifest(bundle_dir, verify_hashes=False).data.get("engines", {}))
    if target_name:
        return target_name
    if len(built) != 1:
        raise ConfigError(f"--backends trt needs --target (engines built: {', '.join(built) or 'none'}; "
                          f"`edgeprune build {bundle_dir} --target T` builds them)")
    return built[0]
