"""ONNX graph passes that shape an exported graph for a target: pattern + check + replacement.

Each pass takes a loaded `onnx.ModelProto` (external data loaded), edits it in place, and returns
a `PassResult` whose truth value says whether it changed anything; a node it cannot rewrite
raises ExportError naming the node and the reason. New nodes are named after the node they
replace (`<name>/<role>`), so a Polygraphy diff still points at the source module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgeprune.errors import ExportError
from edgeprune.onnx_export import default_opset

FP16_MIN_BYTES = 1024  # fp32 weights below this (biases of tiny layers, scalars) stay fp32


@dataclass
class PassResult:
    name: str
    changed: int  # nodes rewritten

    def __bool__(self) -> bool:
        return self.changed > 0


def _consumers(graph) -> dict[str, list]:
    uses: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            uses.setdefault(name, []).append(node)
    return uses


def decompose_layernorm(model) -> PassResult:
    """LayerNormalization -> primitive ops, for parsers without it (TensorRT 8.5, Jetson Xavier).

        X ─┬─ ReduceMean ─┐
           └──────────── Sub ─ D ─┬─ Mul(D, D) ─ ReduceMean ─ Add(eps) ─ Sqrt ─┐
                                  └──────────────────────────────────────── Div ─ Mul(scale) ─ Add(bias) ─ Y

    Only the normalisation over the last axis (axis = -1, all CLIP/LLaMA norms) and only the `Y`
    output are handled; anything else is refused by name.
    """
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    opset = default_opset(model)
    new_nodes, changed = [], 0
    for node in graph.node:
        if node.op_type != "LayerNormalization":
            new_nodes.append(node)
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("axis", -1) != -1:
            raise ExportError(f"cannot decompose {node.name}: LayerNormalization over axis {attrs['axis']} (only -1)")
        if len([o for o in node.output if o]) > 1:
            raise ExportError(f"cannot decompose {node.name}: its Mean/InvStdDev outputs are used")
        eps = float(attrs.get("epsilon", 1e-5))
        x, scale = node.input[0], node.input[1]
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        p = node.name or node.output[0]
        eps_name = f"{p}/epsilon"
        graph.initializer.append(numpy_helper.from_array(np.array(eps, np.float32), eps_name))

        def mean(inp: str, out: str, role: str):
            if opset >= 18:  # axes became an input in opset 18
                axes = f"{p}/axes"
                if not any(i.name == axes for i in graph.initializer):
                    graph.initializer.append(numpy_helper.from_array(np.array([-1], np.int64), axes))
                return helper.make_node("ReduceMean", [inp, axes], [out], name=f"{p}/{role}", keepdims=1)
            return helper.make_node("ReduceMean", [inp], [out], name=f"{p}/{role}", axes=[-1], keepdims=1)

        t = lambda role: f"{p}/{role}_output"  # noqa: E731
        y = node.output[0]
        new_nodes += [
            mean(x, t("mean"), "mean"),
            helper.make_node("Sub", [x, t("mean")], [t("centered")], name=f"{p}/centered"),
            helper.make_node("Mul", [t("centered"), t("centered")], [t("square")], name=f"{p}/square"),
            mean(t("square"), t("var"), "var"),
            helper.make_node("Add", [t("var"), eps_name], [t("var_eps")], name=f"{p}/var_eps"),
            helper.make_node("Sqrt", [t("var_eps")], [t("std")], name=f"{p}/std"),
            helper.make_node("Div", [t("centered"), t("std")], [t("normed")], name=f"{p}/normed"),
            helper.make_node("Mul", [t("normed"), scale], [t("scaled") if bias else y], name=f"{p}/scale"),
        ]
        if bias:
            new_nodes.append(helper.make_node("Add", [t("scaled"), bias], [y], name=f"{p}/bias"))
        changed += 1
    if changed:
        del graph.node[:]
        graph.node.extend(new_nodes)
        onnx.checker.check_model(model, full_check=False)
    return PassResult("decompose-layernorm", changed)


def fp16_matmuls(model) -> PassResult:
    """Runs every MatMul / Gemm with a large fp32 weight in fp16, weights stored in fp16; embedding tables
    (a Gather from a large weight) are stored in fp16 too.

        A (fp32) ─ Cast(fp16) ─ MatMul/Gemm(W fp16 [, bias fp16]) ─ Cast(fp32) ─ Y (fp32)
        ids ─ Gather(E fp16) ─ Cast(fp32) ─ Y (fp32)

    Everything else stays fp32: norms (RMSNorm's Pow/ReduceMean overflow in fp16), softmax, masks
    (-1e9 is not an fp16 number), positions and token selection (order keys above 2048 are not exact
    in fp16). The matmuls hold nearly all the weights and FLOPs, so this halves the weight bytes and
    puts the heavy work on the fp16 units; TensorRT fuses the casts into neighbouring layers. A weight
    that any other node also reads (e.g. a tied embedding) stays fp32.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    uses = _consumers(graph)

    def only_read_by(name: str, ops: tuple[str, ...]) -> bool:
        t = inits.get(name)
        return (t is not None and t.data_type == TensorProto.FLOAT
                and all(u.op_type in ops for u in uses.get(name, [])))

    def large(name: str) -> bool:
        return int(np.prod(inits[name].dims)) * 4 >= FP16_MIN_BYTES

    def convertible(node) -> bool:
        if node.op_type == "Gather":  # an embedding table: data is the weight, indices the activation
            return only_read_by(node.input[0], ("Gather",)) and large(node.input[0])
        weight = node.input[1]
        if not only_read_by(weight, ("MatMul", "Gemm")) or not large(weight):
            return False
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 else ""
        return not bias or only_read_by(bias, ("MatMul", "Gemm"))

    def to_fp16(name: str) -> None:
        if name not in converted:
            t = inits[name]
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), name))
            converted.add(name)

    converted: set[str] = set()
    new_nodes, changed = [], 0
    for node in graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Gather") or not convertible(node):
            new_nodes.append(node)
            continue
        p = node.name or node.output[0]
        y16, y = f"{p}/output_fp16", node.output[0]
        if node.op_type == "Gather":
            to_fp16(node.input[0])
        else:
            weights = [node.input[1]] + ([node.input[2]] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else [])
            for w in weights:
                to_fp16(w)
            a16 = f"{p}/input_fp16"
            new_nodes.append(helper.make_node("Cast", [node.input[0]], [a16], name=f"{p}/cast_in", to=TensorProto.FLOAT16))
            node.input[0] = a16
        node.output[0] = y16
        new_nodes.append(node)
        new_nodes.append(helper.make_node("Cast", [y16], [y], name=f"{p}/cast_out", to=TensorProto.FLOAT))
        changed += 1
    if changed:
        del graph.node[:]
        graph.node.extend(new_nodes)
        del graph.value_info[:]  # types of rewired tensors changed; shape inference rebuilds them
    return PassResult("fp16-matmuls", changed)
