"""Graph forms per target: the opset, precision and graph passes an export for a target needs."""

from __future__ import annotations

from typing import Callable

from edgeprune.errors import ConfigError
from edgeprune.recipe import Recipe

# precisions whose graphs only ONNX Runtime runs (edgeprune/quantize.py) -> why, for every TensorRT target
CPU_ONLY_PRECISIONS = {
    "int8": ("this bundle's INT8 graphs are ONNX Runtime dynamic quantization (MatMulInteger, DynamicQuantizeLinear: "
             "CPU only, no TensorRT parser takes them); export with --target T --precision int8 for TensorRT's "
             "Q/DQ INT8, or with --precision fp32 or fp16"),
    "int4": ("INT4 weights are ONNX Runtime's com.microsoft::MatMulNBits (CPU only, no TensorRT parser takes it); "
             "export for TensorRT with --precision fp32 or fp16"),
}

# op type -> the pass that removes it, for targets whose parser lacks the op
DECOMPOSITIONS = {"LayerNormalization": "decompose_layernorm"}


def is_qdq(onnx_info: dict) -> bool:
    """Whether a manifest's `onnx` section says every quantized graph is in TensorRT's Q/DQ form (edgeprune/qdq.py)."""
    forms = onnx_info.get("quantized") if isinstance(onnx_info, dict) else None
    return bool(forms) and all(isinstance(f, dict) and f.get("form") == "qdq" for f in forms.values())


def precision_problem(target, precision: str, qdq: bool = False) -> str | None:
    """Why `target` (a trt.targets.Target) cannot run graphs of `precision`, or None when it can.

    `qdq`: the graphs are (or, at export for a target, will be) TensorRT's explicit INT8 form, not ONNX Runtime's."""
    if precision in CPU_ONLY_PRECISIONS and not (qdq and precision == "int8"):
        return CPU_ONLY_PRECISIONS[precision]  # before the target's own list: P40's "int8" is TensorRT's
    if precision in target.precisions:
        return None
    return target.precision_notes.get(precision, f"it builds {', '.join(p.upper() for p in target.precisions)} only")


def resolve_for_target(recipe: Recipe, opset_given: bool) -> Recipe:
    """The recipe with its opset lowered to the target's highest (unless --opset was given); ConfigError
    when the target cannot run the recipe's precision."""
    if not recipe.onnx.target:
        return recipe
    from edgeprune.trt.targets import get_target

    target = get_target(recipe.onnx.target)
    precision = recipe.onnx.precision
    why = precision_problem(target, precision, qdq=True)  # a target's int8 export is Q/DQ (quantize.py)
    if why:
        raise ConfigError(f"target {target.name} cannot run {precision.upper()}: {why}")
    if not opset_given and recipe.onnx.opset > target.max_opset:
        return recipe.override(opset=target.max_opset)
    return recipe


def graph_passes(recipe: Recipe) -> list[Callable]:
    """The ONNX passes every exported graph gets for this recipe, in order."""
    from edgeprune import graph_passes as gp

    passes = []
    if recipe.onnx.target:
        from edgeprune.trt.targets import get_target, op_refusal

        target = get_target(recipe.onnx.target)
        passes += [getattr(gp, fn) for op, fn in DECOMPOSITIONS.items() if op_refusal(target, op)]
    if recipe.onnx.precision == "fp16":
        passes.append(gp.fp16_matmuls)
    return passes
