"""EPContext wrapper models: how ONNX Runtime's TensorRT providers load an engine that `edgeprune build` made.

ONNX Runtime runs a prebuilt engine through a one-node ONNX model (README "GPU backends"; ONNX Runtime's
"EP Context Design" document): a `com.microsoft::EPContext` node whose inputs and outputs are the graph's,
with `embed_mode=0` and `ep_cache_context` naming the engine file relative to the wrapper model, and
`source` naming the provider that owns it. The runtime never imports onnx, so the toolchain writes the
wrapper beside each engine at build time, from the ONNX graph the engine was built from:

    engines/<target>/vision.engine     vision.ctx.onnx  (inputs/outputs of vision/vision.onnx)
    engines/<target>/lm.engine         lm.ctx.onnx      (inputs/outputs of lm/step.onnx, T dynamic)
"""

from __future__ import annotations

from pathlib import Path

# ONNX Runtime's provider for each TensorRT library (runtime backends/select.py ENGINE_PROVIDERS says the same)
PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "tensorrt_rtx": "NvTensorRTRTXExecutionProvider"}
CONTEXT_SUFFIX = ".ctx.onnx"


def write_context_model(graph: Path, engine: Path, library: str, dest: Path) -> None:
    """Writes the EPContext model for `engine` (built from the ONNX file `graph`) to `dest`, which must be in
    the engine's directory (the engine is named relative to it). Only the graph's declarations are read."""
    import onnx
    from onnx import helper

    from edgeprune.onnx_export import default_opset

    if engine.parent.resolve() != dest.parent.resolve():
        raise ValueError(f"{dest} must sit beside {engine}")
    source = onnx.load(str(graph), load_external_data=False)
    inputs, outputs = list(source.graph.input), list(source.graph.output)
    node = helper.make_node("EPContext", [i.name for i in inputs], [o.name for o in outputs], name=f"{engine.stem}_engine",
                            domain="com.microsoft", main_context=1, embed_mode=0, ep_cache_context=engine.name,
                            source=PROVIDERS[library])
    wrapper = helper.make_graph([node], f"{engine.stem}_epcontext", inputs, outputs)
    model = helper.make_model(wrapper, ir_version=source.ir_version,
                              opset_imports=[helper.make_opsetid("", default_opset(source)), helper.make_opsetid("com.microsoft", 1)])
    onnx.save(model, str(dest))
