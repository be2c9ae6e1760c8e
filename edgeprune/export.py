"""The export pipeline, top to bottom: load -> plan -> rewrite -> export -> bundle.

The bundle is assembled in a scratch directory beside the destination and renamed into place
only when every graph, hash and check is done, so a failure never leaves a half-written bundle.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Callable

from edgeprune import __version__, bundle_dir, registry
from edgeprune.errors import ExportError
from edgeprune.recipe import Recipe

STAGES = ("load model", "plan shapes", "rewrite model", "export vision graph", "export prefill graph",
          "export decode graph", "export step graph", "shape graphs for the target", "quantize graphs", "store weights once",
          "check graphs", "write manifest")
GRAPH_FILES = {"vision": "vision/vision.onnx", "prefill": "lm/prefill.onnx", "decode": "lm/decode.onnx",
               "step": "lm/step.onnx"}

PROMPT_SENTINEL = "\u2063PROMPT\u2063"  # invisible separator, never in a chat template


def export_bundle(model_name: str, out_dir: str | Path, recipe: Recipe, model_dir: str | None = None,
                  model_options: dict | None = None, on_stage: Callable[[str], None] = lambda s: None,
                  loaded=None, force: bool = False) -> Path:
    """Exports `model_name` (a registry name) as a bundle in `out_dir`, replacing an older bundle there.

    Returns the bundle path. Raises EdgePruneError subclasses for user-fixable problems
    (unknown model, bad directory, bad recipe values, a non-bundle directory in the way, a full disk).
    `loaded` lets callers (bench) pass a model they already loaded. `force` moves a non-bundle directory
    at `out_dir` aside instead of refusing it (bundle_dir.py: nothing is ever deleted but an old bundle).
    """
    import dataclasses

    import torch

    out = Path(out_dir)
    bundle_dir.check_destination(out, force)
    entry = registry.get(model_name)

    on_stage("load model")
    caller_model = loaded is not None  # the caller keeps using it: rewrites edit a copy
    if loaded is None:
        loaded = entry.loader(model_dir, **(model_options or {}))
    model, processor = loaded.model, loaded.processor

    on_stage("plan shapes")
    from edgeprune.plan import plan_shapes

    shapes = plan_shapes(model.config, processor.image_processor, recipe)
    from edgeprune_runtime.preprocess import PreprocessParams

    try:  # the runtime must reproduce the processor exactly; refuse options it does not implement
        preprocess = PreprocessParams.from_processor_dict(processor.image_processor.to_dict(), shapes.partitions)
    except ValueError as e:
        raise ExportError(f"the checkpoint's image processor is not supported: {e}") from None

    on_stage("rewrite model")
    from edgeprune.rewrites import lm_kv_heads
    from edgeprune.rewrites.cost import model_costs
    from edgeprune.rewrites.plan import rewrite_for_export

    costs_before = model_costs(model, shapes)
    model, lm_record, vision_record, reports = rewrite_for_export(loaded, recipe.rewrites, copy=caller_model)
    kv_heads = lm_kv_heads(model)  # per remaining layer; the graphs, cache and manifest follow the modules
    from edgeprune.rewrites.schedules import check_skip_decode, layer_visual_slots, parse_drop_visual, parse_skip_decode

    visual_per_layer = layer_visual_slots(parse_drop_visual(recipe.rewrites.drop_visual_after), len(kv_heads),
                                          shapes.visual_slots)
    shapes = dataclasses.replace(shapes, num_layers=len(kv_heads), kv_heads=kv_heads, layer_visual_slots=visual_per_layer)
    skip_decode = parse_skip_decode(recipe.rewrites.skip_decode)
    check_skip_decode(skip_decode, len(kv_heads))
    from edgeprune_runtime.manifest import per_layer_validity

    per_layer = per_layer_validity(shapes, skip_decode)
    from edgeprune_runtime.cache_policy import HEAVY_HITTER, STOP

    if recipe.cache.sinks >= shapes.cache_capacity:
        raise ExportError(f"--cache-sinks {recipe.cache.sinks} leaves no window in the cache's {shapes.cache_capacity} "
                          "slots; lower it")
    attn_mass = recipe.cache.policy == HEAVY_HITTER  # the decode and step graphs output attn_mass [C]

    from edgeprune.graphs import VISION_OUTPUTS, DecodeGraph, PrefillGraph, StepGraph, VisionGraph, feature_layer_count
    from edgeprune.onnx_export import apply_passes, check_static, export_module, store_weights_once
    from edgeprune.trt.forms import graph_passes
    from edgeprune_runtime.layout import layout_for

    staging = bundle_dir.Staging(out, force)  # .NAME.partial-* beside `out`, trace scratch; SIGTERM acts as Ctrl-C
    stage_dir, scratch = staging.stage_dir, staging.scratch
    try:
        s = shapes
        opset = recipe.onnx.opset
        pinpoints = model.config.image_grid_pinpoints
        # Trace inputs: any image's layout will do, every shape is static (a 1x2 grid here).
        layout = layout_for((s.crop_size, 2 * s.crop_size), pinpoints, s)
        feeds = {k: torch.from_numpy(v) for k, v in layout.feeds().items()}
        feeds["pixel_values"] = torch.zeros(s.partitions, 3, s.crop_size, s.crop_size)

        on_stage("export vision graph")
        vision = VisionGraph(model, s, recipe).eval()
        export_module(vision, tuple(feeds[n] for n in vision.input_names), list(vision.input_names),
                      list(VISION_OUTPUTS), scratch / "vision" / "vision.onnx", opset)

        on_stage("export prefill graph")
        t = s.text_slots_before_image + s.text_slots_after_image
        text_ids = torch.zeros(t, dtype=torch.int64)
        text_valid = torch.zeros(t)
        text_valid[0] = 1.0
        visual_embeds = torch.zeros(s.visual_slots, s.hidden_size)
        visual_valid = torch.ones(s.visual_slots)
        prefill = PrefillGraph(model, s).eval()
        export_module(prefill, (text_ids, text_valid, visual_embeds, visual_valid), list(prefill.input_names),
                      list(prefill.output_names), scratch / "prefill" / "prefill.onnx", opset)

        on_stage("export decode graph")

        def cache_args(skip: int = 0) -> list:  # validity [C_l] (per layer or one shared), then K/V [Hkv_l, C_l, Dh]
            run = range(skip, s.num_layers)
            valid = [torch.zeros(s.cache_slots_at(i)) for i in run] if per_layer else [torch.zeros(s.cache_capacity)]
            return valid + [torch.zeros(s.kv_heads[i], s.cache_slots_at(i), s.head_dim) for i in run for _ in range(2)]

        token = (torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.int64))
        # SkipDecode: one more decode graph per skip count, sharing lm.weights (store_weights_once below)
        decode_graphs = {0: "decode", **{k: f"decode_skip{k}" for k in skip_decode.skips[1:]}}
        for skip, name in decode_graphs.items():
            decode = DecodeGraph(model, s, per_layer, skip, attn_mass=attn_mass and not skip).eval()
            export_module(decode, (*token, *cache_args(skip)), list(decode.input_names), list(decode.output_names),
                          scratch / name / f"{name}.onnx", opset)

        on_stage("export step graph")
        # The LM of TensorRT engines: T slots over the cache, T dynamic (prefill and decode profiles).
        step = StepGraph(model, s, per_layer, attn_mass=attn_mass).eval()
        step_args = (torch.zeros(s.prefill_slots, dtype=torch.int64), torch.zeros(s.prefill_slots, s.hidden_size),
                     torch.zeros(s.prefill_slots), torch.ones(s.prefill_slots), torch.zeros(1, dtype=torch.int64),
                     *cache_args())
        per_slot = [*step.input_names[:4], *(n for n in step.output_names if n.startswith("new_"))]
        export_module(step, step_args, list(step.input_names), list(step.output_names), scratch / "step" / "step.onnx",
                      opset, dynamic_axes={n: {1 if n.startswith(("new_key", "new_value")) else 0: "T"} for n in per_slot})
        graph_files = {**GRAPH_FILES, **{name: f"lm/{name}.onnx" for name in list(decode_graphs.values())[1:]}}

        on_stage("shape graphs for the target")
        passes = graph_passes(recipe)
        applied = {name: apply_passes(scratch / name / f"{name}.onnx", passes) for name in graph_files}

        on_stage("quantize graphs")
        from edgeprune.quantize import quantize_bundle_graphs

        def calibration():  # TensorRT INT8 (Q/DQ): activation ranges from the fp32 graphs on synthetic images
            from edgeprune.qdq import calibration_feeds
            from edgeprune_runtime.tokenize import PromptTokenizer

            tok = PromptTokenizer(processor.tokenizer.backend_tokenizer, processor.image_token,
                                  int(model.config.image_token_id), tuple(_eos_ids(model, processor.tokenizer)),
                                  s.text_slots_before_image, s.text_slots_after_image)
            return calibration_feeds(scratch, s, preprocess, tok, _prompt_template(processor))

        quantized = quantize_bundle_graphs(scratch, recipe.onnx.precision, tuple(graph_files),  # {} for fp32/fp16
                                           target=recipe.onnx.target, calibration=calibration)

        on_stage("store weights once")
        store_weights_once({scratch / "vision" / "vision.onnx": stage_dir / GRAPH_FILES["vision"]},
                           stage_dir / "vision" / "vision.weights")
        store_weights_once({scratch / name / f"{name}.onnx": stage_dir / graph_files[name]
                            for name in graph_files if name != "vision"}, stage_dir / "lm" / "lm.weights")

        on_stage("check graphs")
        for name, rel in graph_files.items():
            check_static(stage_dir / rel, dynamic=("T",) if name == "step" else ())

        on_stage("write manifest")
        tokenizer = processor.tokenizer
        (stage_dir / "tokenizer.json").write_text(tokenizer.backend_tokenizer.to_str())
        manifest = {
            "schema_version": 1,
            "edgeprune_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"model": model_name, "path": loaded.source, "weights_sha256": loaded.weights_sha256,
                       "weights_bytes": loaded.weights_bytes, "options": dict(model_options or {})},
            "recipe": recipe.to_dict(),
            "shapes": {**s.__dict__, "kv_heads": list(s.kv_heads), "layer_visual_slots": list(s.layer_visual_slots)},
            "rewrites": [f"vision: layers after the feature layer dropped "
                         f"({feature_layer_count(model.config)} of {model.config.vision_config.num_hidden_layers} kept)",
                         *(r.summary() for r in reports)],
            # per source layer: whether it runs and which heads it keeps (compare re-applies this)
            "layers": {"lm": _lm_layers(lm_record, s), "vision": [r.to_dict() for r in vision_record]},
            # SkipDecode: [[from decode position, lowest layers skipped], ...]; graphs.decode_skip has their graphs
            **({"skip_decode": skip_decode.to_list()} if skip_decode.stages else {}),
            # the cache policy's default and what eviction needs (edgeprune_runtime/cache_policy.py); stop bundles: none
            **({"cache": _cache_section(recipe, model)} if recipe.cache.policy != STOP else {}),
            # token pruning inside the vision tower: from CLIP layer L on, each partition runs keep[L] patch tokens
            **({"vision_keep": {str(layer): n for layer, n in vision.keep.items()}} if vision.keep else {}),
            "costs": {"before": costs_before, "after": model_costs(model, shapes, vision_keep=vision.keep)},
            "onnx": {"opset": opset, "precision": recipe.onnx.precision, "target": recipe.onnx.target,
                     "passes": {name: {r.name: r.changed for r in results} for name, results in applied.items()},
                     **({"quantized": quantized} if quantized else {})},
            "preprocess": preprocess.to_dict(),
            "tokenizer": {"file": "tokenizer.json", "image_token": processor.image_token,
                          "image_token_id": int(model.config.image_token_id),
                          "eos_token_ids": _eos_ids(model, tokenizer)},
            "prompt_template": _prompt_template(processor),
            "graphs": {"vision": {"file": GRAPH_FILES["vision"], "weights": "vision/vision.weights"},
                       "prefill": {"file": GRAPH_FILES["prefill"]}, "decode": {"file": GRAPH_FILES["decode"]},
                       # T slots: prefill_slots for prefill, 1 or 2 for decode (TensorRT profiles)
                       "step": {"file": GRAPH_FILES["step"], "dynamic": {"T": [1, s.prefill_slots]}},
                       **({"decode_skip": {str(k): {"file": graph_files[name]} for k, name in decode_graphs.items() if k}}
                          if skip_decode.stages else {}),
                       "lm_weights": "lm/lm.weights"},
            "targets": {},
        }
        from edgeprune_runtime.manifest import sha256_file

        manifest["files"] = {str(p.relative_to(stage_dir)): sha256_file(p)
                             for p in sorted(stage_dir.rglob("*")) if p.is_file()}
        (stage_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
        staging.commit()
    except BaseException as e:
        staging.abort()
        bundle_dir.raise_write_error(e, out)  # a full disk or unwritable --out: one ExportError line
        raise
    finally:
        staging.close()
    return out


def _cache_section(recipe: Recipe, model) -> dict:
    """manifest `cache`: the default policy, and the LM's rotary inverse frequencies [Dh/2] (the runtime re-rotates
    kept keys after an eviction) and whether the graphs output attn_mass."""
    from edgeprune_runtime.cache_policy import HEAVY_HITTER

    inv_freq = model.model.language_model.rotary_emb.inv_freq.detach().double().tolist()
    return {"policy": recipe.cache.policy, "sinks": recipe.cache.sinks, "pin_image": recipe.cache.pin_image,
            "attn_mass": recipe.cache.policy == HEAVY_HITTER, "rope_inv_freq": inv_freq}


def _lm_layers(record, shapes) -> list[dict]:
    """layers.lm: each source layer's record, plus for a running layer its visual and cache slots (V_l, C_l)."""
    rows, graph_layer = [], 0
    for r in record:
        row = r.to_dict()
        if r.runs:
            row.update(visual_slots=shapes.visual_slots_at(graph_layer), cache_slots=shapes.cache_slots_at(graph_layer))
            graph_layer += 1
        rows.append(row)
    return rows


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, list) else [eos]
    return [int(i) for i in ids if i is not None]


def _prompt_template(processor) -> str:
    """The chat template rendered around a sentinel: one '<image>' and one '{prompt}'."""
    if not getattr(processor, "chat_template", None):
        return "USER: <image>\n{prompt} ASSISTANT:"
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT_SENTINEL}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    if text.count(PROMPT_SENTINEL) != 1 or text.count(processor.image_token) != 1:
        raise ExportError("the checkpoint's chat template does not place one image and one prompt; "
                          "use --raw-prompt at run time")
    return text.replace(PROMPT_SENTINEL, "{prompt}")
