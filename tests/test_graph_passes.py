"""Graph passes (edgeprune/graph_passes.py): op types after the pass, ONNX Runtime outputs against the
graph before it, the ONNX checker, and the cases a pass must leave alone or refuse."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgeprune.errors import ExportError
from edgeprune.graph_passes import decompose_layernorm, fp16_matmuls


def _run(model, feeds):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _layernorm_model(opset, bias=True, axis=-1):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "scale")]
    ins = ["x", "scale"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "bias"))
        ins.append("bias")
    node = helper.make_node("LayerNormalization", ins, ["y"], name="/ln/LayerNormalization", axis=axis, epsilon=1e-5)
    return _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 5, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5, 16])], inits, opset)


@pytest.mark.parametrize("opset,bias", [(17, True), (17, False), (18, True), (20, True)])
def test_decompose_layernorm_matches_the_op(opset, bias):
    model = _layernorm_model(opset, bias)
    x = np.random.default_rng(1).standard_normal((3, 5, 16)).astype(np.float32) * 3 + 1
    ref = _run(model, {"x": x})[0]
    result = decompose_layernorm(model)
    assert result and result.changed == 1
    ops = [n.op_type for n in model.graph.node]
    assert "LayerNormalization" not in ops and ops.count("ReduceMean") == 2
    assert all(n.name.startswith("/ln/LayerNormalization/") for n in model.graph.node)
    onnx.checker.check_model(model)
    np.testing.assert_allclose(_run(model, {"x": x})[0], ref, atol=1e-5)


def test_decompose_layernorm_refuses_other_axes_and_ignores_graphs_without_it():
    with pytest.raises(ExportError, match="axis 1"):
        decompose_layernorm(_layernorm_model(17, axis=1))
    plain = _model([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])])
    assert not decompose_layernorm(plain)


def _matmul_model():
    """y = x @ W + b (Gemm) ; z = x @ V ; t = x * V[0] (V read by a Mul too) ; e = E[ids]"""
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "W")
    b = numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b")
    v = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "V")
    e = numpy_helper.from_array(rng.standard_normal((50, 32)).astype(np.float32), "E")
    small = numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "S")  # 512 bytes: stays fp32
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["y"], name="/proj/Gemm"),
             helper.make_node("MatMul", ["x", "V"], ["z"], name="/shared/MatMul"),
             helper.make_node("Mul", ["x", "V"], ["t"], name="/shared/Mul"),
             helper.make_node("MatMul", ["x", "S"], ["s"], name="/small/MatMul"),
             helper.make_node("Gather", ["E", "ids"], ["g"], name="/embed/Gather")]
    f = lambda n, shape: helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)  # noqa: E731
    return _model(nodes, [f("x", [32, 32]), helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                  [f("y", [32, 32]), f("z", [32, 32]), f("t", [32, 32]), f("s", [32, 4]), f("g", [3, 32])], [w, b, v, e, small])


def test_fp16_matmuls_converts_only_weights_that_only_matmuls_read():
    model = _matmul_model()
    feeds = {"x": np.random.default_rng(3).standard_normal((32, 32)).astype(np.float32), "ids": np.array([0, 7, 49])}
    ref = _run(model, feeds)
    result = fp16_matmuls(model)
    assert result.changed == 2  # the Gemm and the embedding Gather
    dtypes = {t.name: t.data_type for t in model.graph.initializer}
    assert dtypes == {"W": TensorProto.FLOAT16, "b": TensorProto.FLOAT16, "E": TensorProto.FLOAT16,
                      "V": TensorProto.FLOAT, "S": TensorProto.FLOAT}
    onnx.checker.check_model(model)
    out = _run(model, feeds)
    assert all(o.dtype == np.float32 for o in out)  # graph outputs keep their type
    np.testing.assert_allclose(out[0], ref[0], rtol=2e-2, atol=5e-2)
    np.testing.assert_allclose(out[4], ref[4], atol=2e-3)
    for i in (1, 2, 3):  # untouched nodes give identical results
        np.testing.assert_array_equal(out[i], ref[i])
    assert not fp16_matmuls(model)  # a second run finds nothing left to convert
