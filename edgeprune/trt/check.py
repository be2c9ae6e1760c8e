"""`edgeprune check`: will this bundle build on that target? Answered before anyone owns the device.

Static findings from the graphs and the target profile (opset, every op against the operator table
of the target's parser, dynamic dimensions, TopK k, INT64 tensors, precision, a device-memory
estimate), then, whenever a TensorRT ONNX parser is importable, that parser's own verdict on each
graph, node by node. A bundle is ok when no finding is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeprune.onnx_export import all_nodes, default_opset
from edgeprune.trt.forms import CPU_ONLY_PRECISIONS, precision_problem
from edgeprune.trt.targets import Target, op_refusal, op_table

GRAPHS = ("vision", "prefill", "decode", "step")  # every ONNX graph of a bundle
ENGINE_GRAPHS = ("vision", "step")  # the ones `build` turns into engines
MEMORY_WARN = 0.9  # of the device's memory


@dataclass
class Finding:
    severity: str  # "error" | "warning" | "info"
    graph: str  # a graph name, or "bundle"
    node: str  # node name, or ""
    message: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class MemoryEstimate:
    weights_bytes: int  # vision + LM weights, each once
    kv_cache_bytes: int
    activation_bytes: int  # the largest working set of one node (inputs + outputs), over all graphs
    device_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activation_bytes

    def to_dict(self) -> dict:
        return {**self.__dict__, "total_bytes": self.total_bytes}


@dataclass
class CheckReport:
    target: str
    findings: list[Finding] = field(default_factory=list)
    memory: MemoryEstimate | None = None
    parser: str | None = None  # the real parser used, if any

    @property
    def ok(self) -> bool:
        return not any(f.severity == "error" for f in self.findings)

    def __bool__(self) -> bool:
        return self.ok

    def to_dict(self) -> dict:
        return {"target": self.target, "ok": self.ok, "findings": [f.to_dict() for f in self.findings],
                "memory": self.memory.to_dict() if self.memory else None, "parser": self.parser}


def precision_refusal(target: Target, precision: str) -> str | None:
    """The finding's message when `target` cannot run a bundle of `precision`, else None."""
    why = precision_problem(target, precision)
    if why is None:
        return None
    if precision in CPU_ONLY_PRECISIONS:  # P40's "int8" is TensorRT's, not these ONNX Runtime graphs'
        return f"{precision.upper()} bundles run on ONNX Runtime (CPU) only, not on {target.name}: {why}"
    return f"{precision.upper()} is not allowed on {target.name}: {why}"


def check_bundle(bundle_dir: str | Path, target: Target, memory_gib: float | None = None,
                 use_parser: bool = True, lm_layers: int | None = None) -> CheckReport:
    """All findings for the bundle on `target`. Raises RuntimeStatusError for a bundle that is not valid.

    `lm_layers` sizes the memory estimate as if the language model had that many layers (the bundle's
    per-layer weights and cache repeated): a full 32-layer 7B judged from a shallow export."""
    import onnx

    from edgeprune_runtime.manifest import load_manifest

    manifest = load_manifest(bundle_dir)
    report = CheckReport(target.name)
    add = lambda sev, graph, node, msg: report.findings.append(Finding(sev, graph, node, msg))  # noqa: E731
    data = manifest.data
    onnx_info = data.get("onnx", {})
    precision = onnx_info.get("precision", "fp32")
    refusal = precision_refusal(target, precision)
    if refusal:
        add("error", "bundle", "", refusal)

    graphs = {name: manifest.graphs[name]["file"] for name in GRAPHS if name in manifest.graphs}
    graphs |= {f"decode_skip{k}": e["file"] for k, e in manifest.graphs.get("decode_skip", {}).items()}  # SkipDecode
    if "step" not in graphs:
        add("error", "bundle", "", "no step graph (the LM engine's source): re-export with this edgeprune version")
    activation = 0
    for name, rel in graphs.items():
        model = onnx.load(str(manifest.path(rel)), load_external_data=False)
        _check_graph(model, name, target, manifest, add)
        if name != "step":  # its T is dynamic; at T = S its activations are the prefill graph's
            activation = max(activation, _largest_working_set(model))

    if use_parser:
        report.parser = _real_parser_verdict(graphs, manifest, target, add)
    if report.parser is None:
        add("info", "bundle", "", "no TensorRT parser is installed: ops were checked against the operator table only "
                                  "(pip install 'edgeprune[trt-rtx]' adds a real parse)")

    device = int((memory_gib if memory_gib is not None else target.device_memory_gib) * 2**30)
    weights, cache = _weights_bytes(manifest), _kv_cache_bytes(manifest.shapes)
    if lm_layers is not None:
        weights, cache = _scaled_to_layers(manifest, lm_layers, weights, cache)
    report.memory = MemoryEstimate(weights, cache, activation, device)
    m = report.memory
    scaled = f" as if the LM had {lm_layers} layers" if lm_layers is not None else ""
    summary = (f"device memory estimate{scaled} {_size(m.total_bytes)} (weights {_size(m.weights_bytes)} + "
               f"KV cache {_size(m.kv_cache_bytes)} + activations {_size(m.activation_bytes)}) of "
               f"{_size(device)} on {target.name}")
    if m.total_bytes > device:
        fix = ("the weights alone do not fit: export with --precision fp16 where the target allows it, or take a "
               "device with more memory" if m.weights_bytes > device else
               "lower shapes.new_token_slots or the budget (KV cache), or export with --precision fp16")
        add("error", "bundle", "", f"{summary}: does not fit; {fix}")
    elif m.total_bytes > MEMORY_WARN * device:
        add("warning", "bundle", "", summary + ": little room for the builder's workspace and the application")
    else:
        add("info", "bundle", "", summary)
    return report


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _check_graph(model, name: str, target: Target, manifest, add) -> None:
    from onnx import TensorProto, numpy_helper

    opset = default_opset(model)
    if opset > target.max_opset:
        add("error", name, "", f"opset {opset} is above {target.name}'s maximum {target.max_opset} "
                              f"(TensorRT {target.parser_table}'s parser): re-export with --target {target.name}")
    refused: dict[str, list[str]] = {}
    constants = {t.name: t for t in model.graph.initializer}
    for node in all_nodes(model.graph):
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            constants[node.output[0]] = node.attribute[0].t
    for node in all_nodes(model.graph):
        if node.domain not in ("", "ai.onnx"):
            where = ("an ONNX Runtime CPU op (--precision int4)" if node.domain == "com.microsoft"
                     else "a custom op")
            add("error", name, node.name, f"{node.domain}::{node.op_type} is {where}: TensorRT has no such layer "
                                          "(it needs a plugin); export with --precision fp32 or fp16 for TensorRT")
            continue
        reason = op_refusal(target, node.op_type)
        if reason:
            refused.setdefault(reason, []).append(node.name)
        if node.op_type == "TopK":
            table = op_table()[target.parser_table]["ops"].get("TopK", {})
            sorted_attr = next((a.i for a in node.attribute if a.name == "sorted"), 1)
            if "`sorted` must be 1" in table.get("restrictions", "") and sorted_attr == 0:
                add("error", name, node.name, f"TopK with sorted=0: TensorRT {target.parser_table}'s parser needs "
                                              "sorted=1; re-export with this edgeprune version")
            k = constants.get(node.input[1]) if len(node.input) > 1 else None
            if k is None:
                add("error", name, node.name, "TopK's k is not a constant: TensorRT needs a build-time k")
            elif int(numpy_helper.to_array(k).max()) > target.max_topk:
                add("error", name, node.name, f"TopK k = {int(numpy_helper.to_array(k).max())} is above TensorRT's "
                                              f"{target.max_topk}: lower the budget")
    for reason, nodes in refused.items():  # one finding per refused op type, naming its first node
        more = f" (and {len(nodes) - 1} more)" if len(nodes) > 1 else ""
        add("error", name, nodes[0], reason + more)

    entry = manifest.graphs.get(name)  # decode_skip<k> graphs are nested under graphs.decode_skip: static
    declared = set(entry.get("dynamic", {})) if isinstance(entry, dict) else set()
    int64 = []
    for value in list(model.graph.input) + list(model.graph.output):
        tt = value.type.tensor_type
        for d in tt.shape.dim:
            if not d.HasField("dim_value") and d.dim_param not in declared:
                add("error", name, value.name, f"dynamic dimension {d.dim_param!r} without an optimization profile")
        if tt.elem_type == TensorProto.INT64:
            int64.append(value.name)
    if int64 and not target.int64_native:
        add("warning", name, int64[0], f"INT64 {', '.join(int64)}: TensorRT {target.parser_table} has no INT64 tensors "
                                       "and binds them as INT32 (values are cast down; token ids and positions fit)")


def _largest_working_set(model) -> int:
    """Bytes of the largest node working set (its activation inputs + outputs), from shape inference."""
    import onnx
    from onnx import helper

    inferred = onnx.shape_inference.infer_shapes(model)
    sizes = {}
    weights = {t.name for t in model.graph.initializer}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = v.type.tensor_type
        dims = [d.dim_value for d in tt.shape.dim]
        if tt.elem_type and all(d > 0 for d in dims):
            sizes[v.name] = int(np.prod(dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize
    best = 0
    for node in model.graph.node:
        total = sum(sizes.get(n, 0) for n in node.input if n not in weights) + sum(sizes.get(n, 0) for n in node.output)
        best = max(best, total)
    return best


def _weights_bytes(manifest) -> int:
    files = {manifest.graphs["vision"].get("weights"), manifest.graphs.get("lm_weights")}
    return sum(manifest.path(f).stat().st_size for f in files if f)


def _scaled_to_layers(manifest, layers: int, weights: int, cache: int) -> tuple[int, int]:
    """(weights, cache) bytes with the LM's per-layer share repeated to `layers` layers.

    LM tensors with a vocabulary dimension (embedding, head) count once; every other LM tensor belongs
    to a layer (the final norm, [D], is counted as per-layer too: under 0.01% of a layer)."""
    import json

    s = manifest.shapes
    index = json.loads(manifest.path(manifest.graphs["lm_weights"] + ".json").read_text())["tensors"]
    per_layers = sum(t["length"] for t in index if s.vocab_size not in t["shape"])
    weights += (layers - s.num_layers) * per_layers // s.num_layers
    cache = cache * layers // s.num_layers
    return weights, cache


def _kv_cache_bytes(s) -> int:
    return 2 * sum(h * s.cache_slots_at(i) for i, h in enumerate(s.kv_heads)) * s.head_dim * 4  # fp32 K, V [Hkv_l, C_l, Dh]


def _real_parser_verdict(graphs: dict[str, str], manifest, target: Target, add) -> str | None:
    """Runs an importable TensorRT ONNX parser over every graph; returns its label, or None."""
    from edgeprune.trt.library import parse_onnx, parser_library

    found = parser_library()
    if found is None:
        return None
    trt, label = found
    for name, rel in graphs.items():
        parsed = parse_onnx(trt, manifest.path(rel), target.strongly_typed)
        if parsed.ok:
            add("info", name, "", f"{label} parser: parsed")
            continue
        for node, op, msg in parsed.errors or [("", "", "refused without a message")]:
            add("error", name, node, f"{label} parser: {op + ': ' if op else ''}{msg}")
    return label
