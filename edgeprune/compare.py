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
from dataclasses import dataclass
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


@dataclass
class CompareReport:
    rows: list[OutputDiff]
    atol: float
    rtol: float

    def __bool__(self) -> bool:
        return all(r.passed for r in self.rows)

    def to_dict(self) -> dict:
        return {"passed": bool(self), "atol": self.atol, "rtol": self.rtol, "outputs": [r.__dict__ for r in self.rows]}


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


def _compare_stage(stage: str, torch_runner, onnx_path: Path, feed: dict, atol: float, rtol: float):
    """Runs both runners on `feed`; returns (rows, onnx outputs)."""
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR  # its per-inference INFO lines would bury the table

    ort_runner = OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"]), name=f"onnxrt-{stage}")
    results = Comparator.run([torch_runner, ort_runner], data_loader=[feed], warm_up=0, save_inputs_path=None)
    accuracy = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol),
                                           fail_fast=False)
    rows = []
    for iteration in next(iter(accuracy[0].values())):  # one compare func, one runner pair
        for output, res in iteration.items():
            rows.append(OutputDiff(stage, output, float(res.max_absdiff), float(res.max_reldiff), bool(res)))
    onnx_out = dict(results[1][1][0])
    return rows, onnx_out


def compare_bundle(bundle_dir: str | Path, image_path: str, prompt: str = SAMPLE_PROMPT, raw_prompt: bool = False,
                   atol: float = 1e-4, rtol: float = 1e-3, model_dir: str | None = None) -> CompareReport:
    """Compares the bundle's ONNX graphs with eager PyTorch stage by stage. Raises EdgePruneError /
    RuntimeStatusError for a bad bundle, image or prompt, or a source model that is not the one exported."""
    from edgeprune.graphs import VISION_OUTPUTS, DecodeGraph, PrefillGraph, VisionGraph
    from edgeprune.recipe import recipe_from_dict
    from edgeprune_runtime.generator import LoadedBundle
    from edgeprune_runtime.kvcache import KVCache, prefill_slot_valid
    from edgeprune_runtime.layout import layout_for
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

    pixel_values, image_hw = preprocess(load_image(image_path), bundle.preprocess_params)
    pp = bundle.preprocess_params
    layout = layout_for(image_hw, pp.image_grid_pinpoints, s)
    vision = VisionGraph(loaded.model, s, recipe).eval()
    feed = {"pixel_values": pixel_values, **layout.feeds()}
    feed = {n: feed[n] for n in vision.input_names}
    rows, v_out = _compare_stage("vision", _torch_runner(vision, list(vision.input_names), list(VISION_OUTPUTS),
                                                         "torch-vision", feed),
                                 m.path(m.graphs["vision"]["file"]), feed, atol, rtol)

    tok = bundle.tokenizer
    before, after = tok.encode_prompt(tok.prompt_text(prompt, bundle.prompt_template, raw_prompt))
    t1, t2 = s.text_slots_before_image, s.text_slots_after_image
    text_ids, text_valid = text_slots(before, after, t1, t2)
    prefill_inputs = ["text_ids", "text_valid", "visual_embeds", "visual_valid"]
    kv = [f"{kind}_{i}" for i in range(s.num_layers) for kind in ("key", "value")]
    feed = {"text_ids": text_ids, "text_valid": text_valid, "visual_embeds": v_out["visual_embeds"],
            "visual_valid": v_out["visual_valid"]}
    prefill = PrefillGraph(loaded.model, s).eval()
    more, p_out = _compare_stage("prefill", _torch_runner(prefill, prefill_inputs, ["logits", *kv], "torch-prefill", feed),
                                 m.path(m.graphs["prefill"]["file"]), feed, atol, rtol)
    rows += more

    # The cache as the runtime fills it from the ONNX prefill outputs, then the first generated token.
    cache = KVCache(s.kv_heads, s.cache_capacity, s.head_dim)
    layers = range(s.num_layers)
    n = cache.fill_from_prefill([p_out[f"key_{i}"] for i in layers], [p_out[f"value_{i}"] for i in layers],
                                prefill_slot_valid(text_valid, v_out["visual_valid"], t1))
    feed = {"token_id": np.array([int(np.argmax(p_out["logits"]))], np.int64), "position": np.array([n], np.int64),
            "cache_valid": cache.valid}
    for i in layers:
        feed[f"past_key_{i}"], feed[f"past_value_{i}"] = cache.keys[i], cache.values[i]
    decode_inputs = ["token_id", "position", "cache_valid", *[f"past_{k}" for k in kv]]
    decode = DecodeGraph(loaded.model, s).eval()
    more, _ = _compare_stage("decode", _torch_runner(decode, decode_inputs, ["logits", *[f"new_{k}" for k in kv]],
                                                     "torch-decode", feed),
                             m.path(m.graphs["decode"]["file"]), feed, atol, rtol)
    rows += more
    return CompareReport(rows, atol, rtol)
