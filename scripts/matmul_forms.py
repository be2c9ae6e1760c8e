"""Times one LLaMA-7B MLP matmul (x [M, 4096] @ W [4096, 11008]) in each weight form ONNX Runtime offers on CPU:
fp32, INT8 dynamic (quantize_dynamic) and INT4 MatMulNBits at several block sizes / accuracy levels, for a
prefill-sized M (704 rows) and a decode-sized M (1 row). The table behind `quantize.INT4_BLOCK`.

    .venv/bin/python scripts/matmul_forms.py [--threads 2] [--json]

Prints one line per form: best of 3 runs (704 rows) and of 20 runs (1 row), milliseconds; with --json one
JSON object with provenance instead (docs/results/matmul-forms.json via scripts/record_result.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from edgeprune.provenance import provenance  # noqa: E402

K, N = 4096, 11008  # LLaMA-7B hidden and MLP sizes


def fp32_model(w: np.ndarray) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g", [x], [y],
                              [numpy_helper.from_array(w, "W")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def int4_model(w: np.ndarray, block: int, accuracy: int) -> onnx.ModelProto:
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=accuracy)
    quantizer = MatMulNBitsQuantizer(fp32_model(w), algo_config=config)
    quantizer.process()
    return quantizer.model.model


def int8_model(w: np.ndarray) -> onnx.ModelProto:
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(fp32_model(w), f"{tmp}/fp32.onnx")
        quantize_dynamic(f"{tmp}/fp32.onnx", f"{tmp}/int8.onnx", weight_type=QuantType.QInt8,
                         extra_options={"MatMulConstBOnly": True})
        return onnx.load(f"{tmp}/int8.onnx")


def best_ms(model: onnx.ModelProto, rows: int, runs: int, threads: int, rng) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), so)
    x = rng.standard_normal((rows, K)).astype(np.float32)
    session.run(None, {"x": x})  # warm-up (prepacking happened at load)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, {"x": x})
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON object (with provenance)")
    args = parser.parse_args()
    logging.getLogger().setLevel(logging.ERROR)  # the quantizers' pre-processing advice
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((K, N)) * 0.02).astype(np.float32)
    forms = [("fp32", lambda: fp32_model(w)), ("INT8 dynamic", lambda: int8_model(w))]
    forms += [(f"INT4 block {b}, acc {a}", lambda b=b, a=a: int4_model(w, b, a))
              for b, a in [(32, 4), (64, 4), (128, 4), (256, 4), (32, 0)]]
    rows = []
    if not args.json:
        print(f"{'form':24s} {'704 rows (prefill)':>20s} {'1 row (decode)':>16s}")
    for name, make in forms:
        model = make()
        row = {"form": name, "prefill_704_ms": best_ms(model, 704, 3, args.threads, rng),
               "decode_1_ms": best_ms(model, 1, 20, args.threads, rng)}
        rows.append(row)
        if not args.json:
            print(f"{name:24s} {row['prefill_704_ms']:17.0f} ms {row['decode_1_ms']:13.2f} ms", flush=True)
    if args.json:
        print(json.dumps({"matmul": {"k": K, "n": N}, "threads": args.threads, "rows": rows, "provenance": provenance()}))


if __name__ == "__main__":
    main()
