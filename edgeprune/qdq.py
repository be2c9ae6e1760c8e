"""TensorRT INT8: Q/DQ graphs from ONNX Runtime's static quantizer, calibrated on built-in synthetic images.

`export --precision int8 --target T`, for a TensorRT target whose GPUs build INT8 (p40, the Jetsons: their
profile lists "int8"), gives every graph this form instead of the CPU's dynamic INT8 (quantize.py):

    x ─ QuantizeLinear ─ DequantizeLinear ─┐
                                           MatMul ─ y          (weights: int8 initializer ─ DequantizeLinear)
    W_int8 ─────────── DequantizeLinear ───┘

- `onnxruntime.quantization.quantize_static(quant_format=QuantFormat.QDQ)`: weight MatMuls only
  (`MatMulConstBOnly`), weights int8 per output channel, activations int8 per tensor, both symmetric (zero
  point 0), the explicit-quantization form TensorRT takes (its Q/DQ layers require zero points of 0).
  TensorRT fuses each pair into an INT8 GEMM; ONNX Runtime runs the graph too (as fp32 with rounding).
- The selection-scoring MatMuls of the vision graph stay fp32, as in the CPU forms (quantize.scoring_nodes).
- Calibration (activation ranges, MinMax): `CALIBRATION_IMAGES` synthetic photos (edgeprune.sample_image at
  sizes that give different crop grids) x `CALIBRATION_PROMPTS`, fed as the runtime feeds them: the vision
  graph gets the runtime's preprocessing and layout; prefill gets the fp32 vision graph's output and the
  tokenized prompt; decode gets the cache the fp32 prefill filled and its greedy token; step gets the
  prefill request in T = S slots (as `compare` builds it). Every feed comes from the fp32 graphs, before
  any graph is quantized.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

# (width, height): a landscape, a portrait and a square image pick different anyres grids
CALIBRATION_IMAGES = ((640, 480), (360, 720), (800, 800))
CALIBRATION_PROMPTS = ("What is on the table?", "Describe it.")  # short: they must fit the smallest text slots


def calibration_feeds(scratch: Path, shapes, preprocess_params, prompt_tokenizer, template: str) -> dict[str, list[dict]]:
    """{graph: [feed, ...]} for "vision", "prefill", "decode", "step", from the fp32 graphs `scratch/<g>/<g>.onnx`.

    `prompt_tokenizer` is an edgeprune_runtime.tokenize.PromptTokenizer over the bundle's tokenizer, `template`
    the bundle's prompt template."""
    import onnxruntime as ort

    from edgeprune.sample_image import make_sample_image
    from edgeprune_runtime.kvcache import KVCache, prefill_slot_valid
    from edgeprune_runtime.layout import layout_for
    from edgeprune_runtime.preprocess import preprocess
    from edgeprune_runtime.tokenize import text_slots

    s = shapes
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = lambda name: ort.InferenceSession(str(scratch / name / f"{name}.onnx"), so)  # noqa: E731
    vision, prefill = session("vision"), session("prefill")
    declared = {name: _graph_inputs(scratch / name / f"{name}.onnx") for name in ("vision", "decode", "step")}
    feeds: dict[str, list[dict]] = {"vision": [], "prefill": [], "decode": [], "step": []}
    t1, t2 = s.text_slots_before_image, s.text_slots_after_image
    layers = range(s.num_layers)
    pick = lambda graph, pool: {name: pool[name] for name in declared[graph]}  # noqa: E731 (the graph's own inputs)
    for width, height in CALIBRATION_IMAGES:
        pixel_values, image_hw = preprocess(make_sample_image(width, height), preprocess_params)
        layout = layout_for(image_hw, preprocess_params.image_grid_pinpoints, s)
        feed = pick("vision", {"pixel_values": pixel_values, **layout.feeds()})
        feeds["vision"].append(feed)
        embeds, visual_valid, _ = vision.run(["visual_embeds", "visual_valid", "visual_source"], feed)
        for prompt in CALIBRATION_PROMPTS:
            before, after = prompt_tokenizer.encode_prompt(prompt_tokenizer.prompt_text(prompt, template, False))
            text_ids, text_valid = text_slots(before, after, t1, t2)
            p_feed = {"text_ids": text_ids, "text_valid": text_valid, "visual_embeds": embeds, "visual_valid": visual_valid}
            feeds["prefill"].append(p_feed)
            out = dict(zip([o.name for o in prefill.get_outputs()], prefill.run(None, p_feed)))
            full = prefill_slot_valid(text_valid, visual_valid, t1)
            # the cache as the runtime fills it (per-layer sizes and validity where rewrites made them differ)
            cache = KVCache(s.kv_heads, [s.cache_slots_at(i) for i in layers], s.head_dim)
            n = cache.fill_from_prefill([out[f"key_{i}"] for i in layers], [out[f"value_{i}"] for i in layers],
                                        [out.get(f"slot_valid_{i}", full) for i in layers])
            pool = {"token_id": np.array([int(np.argmax(out["logits"]))], np.int64), "position": np.array([n], np.int64),
                    "cache_valid": cache.valid[0].copy()}
            for i in layers:
                pool[f"cache_valid_{i}"] = cache.valid[i].copy()
                pool[f"past_key_{i}"], pool[f"past_value_{i}"] = cache.keys[i].copy(), cache.values[i].copy()
            feeds["decode"].append(pick("decode", pool))
            v = s.visual_slots
            step = {"token_ids": np.concatenate([text_ids[:t1], np.zeros(v, np.int64), text_ids[t1:]]),
                    "visual_embeds": np.concatenate([np.zeros((t1, s.hidden_size), np.float32), embeds,
                                                     np.zeros((t2, s.hidden_size), np.float32)]),
                    "is_visual": np.concatenate([np.zeros(t1), np.ones(v), np.zeros(t2)]).astype(np.float32),
                    "slot_valid": full, "position": np.zeros(1, np.int64),
                    "cache_valid": np.zeros(s.cache_capacity, np.float32)}
            for i, h in enumerate(s.kv_heads):  # an empty cache
                step[f"cache_valid_{i}"] = np.zeros(s.cache_slots_at(i), np.float32)
                for kind in ("key", "value"):
                    step[f"past_{kind}_{i}"] = np.zeros((h, s.cache_slots_at(i), s.head_dim), np.float32)
            feeds["step"].append(pick("step", step))
    return feeds


def _graph_inputs(path: Path) -> set[str]:
    """The runtime inputs a graph declares (its weights not loaded)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {i.name for i in graph.input} - {t.name for t in graph.initializer}


def quantize_qdq(src: Path, dst: Path, feeds: list[dict], keep_fp32: list[str] = ()) -> None:
    """Writes `src` (ONNX, external data beside it) as a Q/DQ INT8 graph to `dst`, activation ranges from `feeds`."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter(feeds)

        def get_next(self):
            return next(self.feeds, None)

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's pre-processing advice
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:  # the calibrator's augmented model goes here
        out = Path(tmp) / dst.name
        quantize_static(src, out, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=list(keep_fp32), use_external_data_format=True,
                        calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": True,
                                       "WeightSymmetric": True, "CalibTensorRangeSymmetric": True})
        model = onnx.load(str(out))
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{dst.stem}.data", size_threshold=1024)

