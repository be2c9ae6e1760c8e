"""torch module -> static ONNX file, and the pass that stores weights once for several graphs.

Uses the TorchScript exporter: it honours opset 17 (the dynamo exporter silently stays at 18,
measured on torch 2.13), and with constant folding it leaves no shape arithmetic behind.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from edgeprune.errors import ExportError, InternalError
from edgeprune_runtime.manifest import WeightEntry

INLINE_LIMIT = 1024  # bytes; smaller initializers (shape constants, scalars) stay inside the graph
ALIGN = 64  # byte alignment of every tensor in a weights file (mmap views stay SIMD-aligned)


def export_module(module, args: tuple, input_names: list[str], output_names: list[str], path: Path, opset: int,
                  dynamic_axes: dict[str, dict[int, str]] | None = None) -> None:
    """Traces `module(*args)` into `path`; checks the opset we really got.

    Shapes are static except the axes named in `dynamic_axes` ({tensor: {axis: name}}), which only the
    step graph uses (its slot count T spans TensorRT's prefill and decode profiles)."""
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, args, str(path), input_names=input_names, output_names=output_names,
            opset_version=opset, dynamo=False, do_constant_folding=True, dynamic_axes=dynamic_axes,
        )
    model = onnx.load(str(path), load_external_data=False)
    got = default_opset(model)
    if got != opset:
        raise ExportError(f"asked the exporter for opset {opset} but got {got}; set onnx.opset = {got} in the recipe")
    if dynamic_axes:
        _declare_output_shapes(model, path, module, args, dynamic_axes)


def _declare_output_shapes(model, path: Path, module, args: tuple, dynamic_axes: dict[str, dict[int, str]]) -> None:
    """Declares each output's shape as traced, except the named dynamic axes.

    With a dynamic axis the exporter's shape inference gives up on some outputs' other dimensions
    (`new_key_0` came out [Hkv, T, 'Addnew_key_0_dim_2']); the traced outputs say what they are."""
    import onnx
    import torch

    with torch.no_grad():
        outs = module(*args)
    for value, traced in zip(model.graph.output, outs):
        dims = value.type.tensor_type.shape.dim
        names = dynamic_axes.get(value.name, {})
        del dims[:]
        for axis, size in enumerate(traced.shape):
            d = dims.add()
            if axis in names:
                d.dim_param = names[axis]
            else:
                d.dim_value = int(size)
    onnx.save(model, str(path))


def store_weights_once(graphs: dict[Path, Path], weights_path: Path) -> list[WeightEntry]:
    """Moves the large initializers of several graphs into ONE external-data file, each tensor once.

    `graphs` maps an exported graph (in a scratch dir, possibly with its own external data) to
    the path it must be written to; `weights_path` sits in the same directory as the outputs.
    Identical tensors (same bytes, dtype, shape) are stored once and given one name in every graph
    that uses them, so a runtime can load them once and share them between sessions. Also writes
    `<weights>.json` listing name/offset/length/dtype/shape for runtimes that cannot parse ONNX.
    """
    import onnx
    from onnx import external_data_helper, numpy_helper

    by_digest: dict[str, WeightEntry] = {}
    names_taken: dict[str, str] = {}  # canonical name -> digest
    loaded = []
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    with open(weights_path, "wb") as wf:
        for src, dst in graphs.items():
            if dst.parent != weights_path.parent:
                raise InternalError("graphs and their weights file must share a directory")
            model = onnx.load(str(src), load_external_data=False)
            _inline_constant_attributes(model, src.parent)
            renames: dict[str, str] = {}
            for tensor in model.graph.initializer:
                array = numpy_helper.to_array(tensor, base_dir=str(src.parent))
                data = array.tobytes()
                if len(data) < INLINE_LIMIT:
                    if external_data_helper.uses_external_data(tensor):
                        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
                    continue
                digest = hashlib.sha256(data + array.dtype.str.encode() + str(array.shape).encode()).hexdigest()
                stored = by_digest.get(digest)
                if stored is None:
                    name = tensor.name
                    if names_taken.get(name, digest) != digest:
                        name = f"{name}__{digest[:8]}"
                    pad = (-wf.tell()) % ALIGN
                    wf.write(b"\0" * pad)
                    stored = WeightEntry(name, wf.tell(), len(data), array.dtype.str, tuple(array.shape))
                    wf.write(data)
                    by_digest[digest], names_taken[name] = stored, digest
                if stored.name != tensor.name:
                    renames[tensor.name] = stored.name
                new = onnx.TensorProto(name=stored.name, data_type=tensor.data_type, dims=tensor.dims)
                for key, value in (("location", weights_path.name), ("offset", stored.offset), ("length", stored.length)):
                    entry = new.external_data.add()
                    entry.key, entry.value = key, str(value)
                new.data_location = onnx.TensorProto.EXTERNAL
                tensor.CopyFrom(new)
            if renames:
                for node in all_nodes(model.graph):
                    for i, name in enumerate(node.input):
                        if name in renames:
                            node.input[i] = renames[name]
            loaded.append((model, dst))
    for model, dst in loaded:
        onnx.save(model, str(dst))
    tensors = sorted(by_digest.values(), key=lambda t: t.offset)
    index = {"file": weights_path.name, "tensors": [t.to_dict() for t in tensors]}
    weights_path.with_name(weights_path.name + ".json").write_text(json.dumps(index, indent=1))
    return tensors


def apply_passes(path: Path, passes) -> list:
    """Runs graph passes (edgeprune.graph_passes) over the exported graph at `path`, rewriting it in place.

    Returns the passes' results. The graph and its weights are written back as one external-data file
    beside it, so models over 2 GB (protobuf's limit) work too."""
    import onnx

    if not passes:
        return []
    model = onnx.load(str(path))
    results = [fn(model) for fn in passes]
    if any(results):
        for old in path.parent.iterdir():
            old.unlink()
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{path.stem}.data", size_threshold=INLINE_LIMIT)
    return results


def _inline_constant_attributes(model, base_dir: Path) -> None:
    """Loads the tensors of Constant nodes that the exporter wrote as external data back into the graph.

    Above 2 GB the TorchScript exporter externalises every large tensor, Constant attributes included;
    only initializers go to the shared weights file, so these return to the graph file itself.
    """
    import onnx
    from onnx import external_data_helper, numpy_helper

    for node in all_nodes(model.graph):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR and external_data_helper.uses_external_data(attr.t):
                attr.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attr.t, base_dir=str(base_dir)),
                                                        attr.t.name))


def default_opset(model) -> int:
    """The model's opset of the default ONNX domain."""
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def all_nodes(graph):
    """Every node of `graph`, including those of subgraphs (If/Loop bodies)."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from all_nodes(attr.g)
            for sub in attr.graphs:
                yield from all_nodes(sub)


def check_static(path: Path, dynamic: tuple[str, ...] = ()) -> None:
    """onnx.checker on the file (external data included) and every graph input/output static, except
    dimensions named in `dynamic`."""
    import onnx

    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as e:
        raise ExportError(f"{path.name} fails the ONNX checker: {str(e).splitlines()[0]}") from None
    model = onnx.load(str(path), load_external_data=False)
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if not dims and value.type.tensor_type.elem_type:
            continue  # scalar
        for d in dims:
            if not d.HasField("dim_value") and d.dim_param not in dynamic:
                raise ExportError(f"{path.name}: {value.name} has a dynamic dimension {d.dim_param!r}")
