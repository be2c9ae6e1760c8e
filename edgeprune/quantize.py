"""Quantized graphs with ONNX Runtime's own quantizers (no quantizer of ours): the `--precision` int8 / int4 stage.

Which graph gets which form, per precision (`GRAPH_FORMS`):

    precision  vision                       prefill, step               decode
    int8       INT8 dynamic, scoring fp32   INT8 dynamic                INT8 dynamic
    int4       INT8 dynamic, scoring fp32   INT8 dynamic                INT4 weight-only, block-wise (MatMulNBits)

- INT8 dynamic = `onnxruntime.quantization.quantize_dynamic`: int8 weights per tensor, activations
  quantized at run time (DynamicQuantizeLinear + MatMulInteger). Only MatMuls with a constant weight
  (`MatMulConstBOnly`): attention's activation x activation products stay fp32.
- Selection scoring stays fp32: the q/k projections that `graphs.cls_attention` recomputes to score
  tokens (and the q.k product) are the vision graph's only MatMuls outside a module scope
  (`/layers.N/...`, `/projector/...`), so they are excluded by name. Quantized scoring picks another
  kept set (measured: README "Speed"); what remains is that the hidden states the scores read come from
  the quantized earlier layers.
- INT4 = `onnxruntime.quantization.matmul_nbits_quantizer` (MatMulNBits, com.microsoft), symmetric,
  block 32 along K, accuracy level 4 (int8 activations: VNNI/AMX kernels). Decode reads every weight
  once per token, so it runs at weight-bytes speed: INT4 reads 1/8 of fp32's.
- Why prefill is INT8 and decode INT4 under `int4` (measured, ORT 1.32, 2 threads, one 11008x4096
  MatMul, best of several runs on a shared machine): 704 rows (prefill) fp32 395 ms, INT8 115 ms,
  INT4 282 ms; 1 row (decode) fp32 18.5 ms, INT8 6.6 ms, INT4 3.5 ms. So the LM's matmul weights are
  stored twice under `int4` (INT8 + INT4 = 1.5 bytes per weight, against fp32's 4); everything else
  (embeddings, norms) and every tensor shared by prefill and step is still stored once by
  `onnx_export.store_weights_once`, which dedups by content. `int8` stores the LM once.

Both forms are ONNX Runtime CPU ops (MatMulInteger, DynamicQuantizeLinear, com.microsoft::MatMulNBits):
TensorRT parses none of them (`trt/forms.py` refuses these precisions for every target).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from edgeprune.errors import ExportError, InternalError

QUANTIZED_PRECISIONS = ("int8", "int4")
INT4_BLOCK = 32  # MatMulNBits block size along K (ORT's CPU kernels: 16..256, powers of two)
INT4_ACCURACY_LEVEL = 4  # int8 activations in the MatMulNBits kernels
LM_GRAPHS = ("prefill", "decode", "step")

# precision -> {graph: form}; graphs not listed stay as exported
GRAPH_FORMS = {
    "int8": {"vision": "int8", **{g: "int8" for g in LM_GRAPHS}},
    "int4": {"vision": "int8", "prefill": "int8", "step": "int8", "decode": "int4"},
}


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


def quantize_bundle_graphs(scratch: Path, precision: str, names: tuple[str, ...]) -> dict[str, dict]:
    """Quantizes the exported graphs `scratch/<name>/<name>.onnx` for `precision`, in place.

    Returns {graph name: {"form": ..., "fp32_nodes": [...]}}; fp32/fp16 precisions return {} and touch nothing."""
    import onnx

    forms = GRAPH_FORMS.get(precision, {})
    applied = {}
    for name in names:
        form = forms.get("decode" if name.startswith("decode_skip") else name)  # SkipDecode graphs: decode's form
        if form is None:
            continue
        src = scratch / name / f"{name}.onnx"
        keep = scoring_nodes(onnx.load(str(src), load_external_data=False)) if name == "vision" else []
        dst = scratch / f"{name}-{form}" / f"{name}.onnx"
        quantize_graph(src, dst, form, keep)
        shutil.rmtree(src.parent)
        dst.parent.rename(src.parent)
        applied[name] = {"form": form, "fp32_nodes": keep}
    return applied
