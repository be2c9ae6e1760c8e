"""Quantized graphs with ONNX Runtime's own quantizers (no quantizer of ours): the `--precision` int8 / int4 stage.

Which graph gets which form, per precision (`GRAPH_FORMS`):

    precision  vision                       prefill, step, decode (one copy in lm/lm.weights)
    int8       INT8 dynamic, scoring fp32   INT8 dynamic
    int4       INT8 dynamic, scoring fp32   INT4 weight-only, block-wise (MatMulNBits)

- INT8 dynamic = `onnxruntime.quantization.quantize_dynamic`: int8 weights per tensor, activations
  quantized at run time (DynamicQuantizeLinear + MatMulInteger). Only MatMuls with a constant weight
  (`MatMulConstBOnly`): attention's activation x activation products stay fp32.
- Selection scoring stays fp32: the q/k projections that `graphs.cls_attention` recomputes to score
  tokens (and the q.k product) are the vision graph's only MatMuls outside a module scope
  (`/layers.N/...`, `/projector/...`), so they are excluded by name. Quantized scoring picks another
  kept set (measured: README "Speed"); what remains is that the hidden states the scores read come from
  the quantized earlier layers.
- INT4 = `onnxruntime.quantization.matmul_nbits_quantizer` (MatMulNBits, com.microsoft), symmetric,
  block 128 along K (the GPTQ/AWQ group size), accuracy level 4 (int8 activations: VNNI/AMX kernels).
  Decode reads every weight once per token, so it runs at weight-bytes speed: INT4 reads ~1/7 of fp32's.
- One INT4 copy serves prefill, step and decode: the quantizer is deterministic, so the three graphs' INT4
  blocks and scales are byte-identical and `onnx_export.store_weights_once` (dedup by content) stores them
  once. The block size is what makes INT4 prefill fast enough to share: per form, one LLaMA-7B MLP matmul
  at 704 rows (prefill) and 1 row (decode), `scripts/matmul_forms.py` -> docs/results/matmul-forms.json
  (README "Speed"). Blocks of 128 (the GPTQ/AWQ group size) take INT4 prefill close to INT8's (blocks of 32,
  ORT's default, take it past 2x) and decode below INT8's; 256 is faster still but doubles the weights each
  scale covers (larger rounding error on outlier-heavy real weights). The LM's matmuls then take 0.53 bytes
  per weight, where INT8 prefill + INT4 decode stored 1.53.

Both forms are ONNX Runtime CPU ops (MatMulInteger, DynamicQuantizeLinear, com.microsoft::MatMulNBits):
TensorRT parses none of them. With a TensorRT target (`export --target T --precision int8`) every graph gets
TensorRT's explicit INT8 form instead, Q/DQ pairs calibrated on synthetic images (`TARGET_GRAPH_FORMS`,
edgeprune/qdq.py); INT4 stays refused for every TensorRT target (`trt/forms.py`).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

from edgeprune.errors import ExportError, InternalError

QUANTIZED_PRECISIONS = ("int8", "int4")
INT4_BLOCK = 128  # MatMulNBits block size along K (ORT's CPU kernels: 16..256, powers of two); table above
INT4_ACCURACY_LEVEL = 4  # int8 activations in the MatMulNBits kernels
LM_GRAPHS = ("prefill", "decode", "step")

# precision -> {graph: form}; graphs not listed stay as exported
GRAPH_FORMS = {
    "int8": {"vision": "int8", **{g: "int8" for g in LM_GRAPHS}},
    "int4": {"vision": "int8", **{g: "int4" for g in LM_GRAPHS}},
}
# the same, for a TensorRT target (export --target T): TensorRT's explicit INT8, Q/DQ pairs (edgeprune/qdq.py)
TARGET_GRAPH_FORMS = {"int8": {g: "qdq" for g in ("vision", *LM_GRAPHS)}}


def graph_forms(precision: str, target: str | None) -> dict[str, str]:
    """{graph: form} for an export of `precision`, for ONNX Runtime (no target) or a TensorRT target."""
    return (TARGET_GRAPH_FORMS if target else GRAPH_FORMS).get(precision, {})


def scoring_nodes(model) -> list[str]:
    """Names of the vision graph's selection-scoring matmuls: MatMul/Gemm nodes outside every module scope.

    Raises InternalError when there are none (the exporter's naming changed: quantizing would then
    silently quantize the scores)."""
    names = [n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm")
             and not n.name.startswith(("/layers.", "/projector/"))]
    if not names:
        raise InternalError("no selection-scoring MatMul found in the vision graph (node naming changed?)")
    return names


def quantize_graph(src: Path, dst: Path, form: str, keep_fp32: list[str] = ()) -> None:
    """Writes `src` (an ONNX file, external data beside it) quantized as `form` ("int8" | "int4") to `dst`.

    `keep_fp32` names nodes left unquantized. `dst`'s directory gets the graph and its external data.
    Raises ExportError when the quantization tools are not installed."""
    import logging

    import onnx

    # ORT's quantizers log advice ("consider pre-processing") on the root logger at WARNING; not the user's business
    logging.getLogger().setLevel(logging.ERROR)
    dst.parent.mkdir(parents=True, exist_ok=True)
    if form == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        # quantize_dynamic pre-processes next to its output; keep that out of the bundle's scratch graph dirs
        with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
            out = Path(tmp) / dst.name
            quantize_dynamic(src, out, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                             nodes_to_exclude=list(keep_fp32), use_external_data_format=True,
                             extra_options={"MatMulConstBOnly": True})
            model = onnx.load(str(out))
    elif form == "int4":
        try:
            from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                         MatMulNBitsQuantizer)
        except ImportError as e:
            raise ExportError(f"INT4 needs ONNX Runtime's MatMulNBits quantizer ({e}): pip install onnx-ir") from None
        config = DefaultWeightOnlyQuantConfig(block_size=INT4_BLOCK, is_symmetric=True,
                                              accuracy_level=INT4_ACCURACY_LEVEL)
        quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), nodes_to_exclude=list(keep_fp32), algo_config=config)
        quantizer.process()
        model = quantizer.model.model
    else:
        raise InternalError(f"unknown quantized form {form!r}")
    onnx.save(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{dst.stem}.data", size_threshold=1024)


def quantize_bundle_graphs(scratch: Path, precision: str, names: tuple[str, ...], target: str | None = None,
                           calibration: Callable[[], dict[str, list[dict]]] | None = None) -> dict[str, dict]:
    """Quantizes the exported graphs `scratch/<name>/<name>.onnx` for `precision` (and TensorRT `target`), in place.

    `calibration` gives {graph: [feed, ...]} from the fp32 graphs (qdq.calibration_feeds); it is called once,
    before any graph changes, and only when a form needs activation ranges (Q/DQ).
    Returns {graph name: {"form": ..., "fp32_nodes": [...]}}; fp32/fp16 precisions return {} and touch nothing."""
    import onnx

    forms = graph_forms(precision, target)
    feeds = {}
    if "qdq" in forms.values():
        if calibration is None:
            raise InternalError("Q/DQ quantization needs calibration feeds")
        feeds = calibration()
    applied = {}
    for name in names:
        form = forms.get("decode" if name.startswith("decode_skip") else name)  # SkipDecode graphs: decode's form
        if form is None:
            continue
        src = scratch / name / f"{name}.onnx"
        keep = scoring_nodes(onnx.load(str(src), load_external_data=False)) if name == "vision" else []
        dst = scratch / f"{name}-{form}" / f"{name}.onnx"
        if form == "qdq":
            from edgeprune.qdq import quantize_qdq

            quantize_qdq(src, dst, feeds[name], keep)
        else:
            quantize_graph(src, dst, form, keep)
        shutil.rmtree(src.parent)
        dst.parent.rename(src.parent)
        applied[name] = {"form": form, "fp32_nodes": keep}
    return applied
