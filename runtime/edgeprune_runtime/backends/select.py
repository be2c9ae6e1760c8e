"""Which backend runs a bundle: the one place that turns `auto|cpu|cuda|trt` into ONNX Runtime providers.

    cpu    CPUExecutionProvider; the cache in host memory
    cuda   CUDAExecutionProvider (onnxruntime-gpu) for the bundle's ONNX graphs; the cache on GPU 0
    trt    the engines `edgeprune build` wrote, each loaded through its EPContext wrapper model
           (engines/<target>/<name>.ctx.onnx) by ONNX Runtime's TensorRT provider, or its TensorRT-RTX
           provider for `tensorrt_rtx` engines; the cache on GPU 0
    auto   trt when the bundle has engines that can run here, else cuda when it can run here, else cpu,
           with the reasons for each skip in `Backend.reason`

A backend that cannot run here is refused by name (RuntimeStatusError DEVICE_UNSUPPORTED, or
DEPENDENCY_MISSING for a missing package), one line naming the fix. Nothing here loads a graph.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field

from edgeprune_runtime import ortlib
from edgeprune_runtime.backends.gpu import cc_tuple, compute_capability
from edgeprune_runtime.env import env_int
from edgeprune_runtime.errors import RuntimeStatusError, Status

BACKENDS = ("auto", "cpu", "cuda", "trt")

CUDA_PROVIDER = "CUDAExecutionProvider"
# TensorRT library of an engine (manifest engines.<target>.library) -> (ORT provider, Python module to read its version)
ENGINE_PROVIDERS = {"tensorrt": ("TensorrtExecutionProvider", "tensorrt"),
                    "tensorrt_rtx": ("NvTensorRTRTXExecutionProvider", "tensorrt_rtx_bindings")}
FP16_MIN_CC = (5, 3)  # half-precision arithmetic in CUDA
# precisions whose graphs only ONNX Runtime's CPU kernels run (edgeprune/quantize.py): refused before any load
CPU_ONLY_PRECISIONS = {"int8": "INT8 bundles are ONNX Runtime dynamic quantization (DynamicQuantizeLinear has no CUDA "
                               "kernel); export with --precision fp16 or fp32 for the GPU, or use --backend cpu"}


@dataclass(frozen=True)
class Backend:
    name: str  # "cpu" | "cuda" | "trt"
    device: str  # where the cache lives: "cpu" | "cuda"
    providers: tuple  # InferenceSession(providers=...)
    reason: str  # why this backend (auto says what it skipped and why)
    lm: str = "prefill-decode"  # the LM's graph contract (engine.Engine): "prefill-decode" | "step"
    target: str | None = None  # trt: the engines' target name (manifest engines.<target>)
    engines: dict = field(default_factory=dict)  # trt: graph name ("vision", "lm") -> EPContext model path, bundle-relative
    prefill_chunk: int = 0  # "step": the prompt's valid slots per step call (Engine.start); 0: all S slots in one call

    def make_device(self):
        from edgeprune_runtime.backends.device import HOST, CudaDevice

        return HOST if self.device == "cpu" else CudaDevice(0)

    def to_dict(self) -> dict:
        return {"backend": self.name, "reason": self.reason, "target": self.target}


CPU = Backend("cpu", "cpu", ("CPUExecutionProvider",), "asked for")
# The CPU step path's prefill runs the prompt's valid slots in calls of this many. A step over T slots holds attention
# tensors [H, T, C + T] (past and new keys); on llava-next-7b-shape (H 32, C 960) all 704 slots at once hold
# 150 MB per tensor, several live at the softmax: prefill was the process's peak. 128 slots: 18 MB per tensor.
# The GPU backends keep one call (TensorRT's prefill profile is T = S). EDGEPRUNE_PREFILL_CHUNK overrides it (env.py).
CPU_PREFILL_CHUNK = 128
# The CPU backend running the GPU backends' LM contract (one step graph): how tests here exercise that code path.
CPU_STEP = Backend("cpu", "cpu", ("CPUExecutionProvider",), "asked for", "step")


def cpu_backend(manifest, reason: str = "asked for") -> Backend:
    """The CPU backend for `manifest`'s bundle. Quantized bundles (int8/int4) run their LM through the one step
    graph: ONNX Runtime prepacks quantized weights per session into private memory (MatMulNBits must be
    prepacked: unpacked it dequantizes every weight on every call), so one LM session holds one packed copy
    where prefill + decode sessions held two. Bundles without a step graph, or whose layers hold different
    tokens (which the step path does not run), keep prefill + decode."""
    step = _precision(manifest.data) in ("int8", "int4") and "step" in manifest.graphs and not _per_layer(manifest)
    if not step:
        return Backend("cpu", "cpu", CPU.providers, reason)
    chunk = env_int("EDGEPRUNE_PREFILL_CHUNK", CPU_PREFILL_CHUNK, minimum=0)
    return Backend("cpu", "cpu", CPU.providers, reason, "step", prefill_chunk=chunk)


def select(requested: str, manifest) -> Backend:
    """The backend for `manifest`'s bundle. Raises RuntimeStatusError: INVALID_ARGUMENT (unknown name),
    DEVICE_UNSUPPORTED / DEPENDENCY_MISSING (cuda or trt asked for and impossible here, saying why)."""
    if requested not in BACKENDS:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"unknown backend {requested!r}; use one of {', '.join(BACKENDS)}")
    if requested == "cpu":
        return cpu_backend(manifest)
    if requested == "cuda":
        return cuda_backend(manifest, "asked for")
    if requested == "trt":
        return trt_backend(manifest, "asked for")
    skipped = []
    for make in (trt_backend, cuda_backend):
        try:
            return make(manifest, f"auto: {'; '.join(skipped)}" if skipped else "auto")
        except RuntimeStatusError as e:
            skipped.append(e.message)
    return cpu_backend(manifest, "auto: " + "; ".join(skipped))


def open_with(requested: str, manifest, open_engine):
    """(backend, open_engine(backend)) for `requested`. Under `auto`, a GPU backend whose sessions cannot be made here
    (a node its provider lacks, a CUDA library missing) gives way to the CPU, the reason recorded; a backend asked
    for by name raises instead."""
    backend = select(requested, manifest)
    try:
        return backend, open_engine(backend)
    except RuntimeStatusError as e:
        if requested != "auto" or backend.name == "cpu" or e.status not in (Status.DEVICE_UNSUPPORTED, Status.DEPENDENCY_MISSING):
            raise
        cpu = cpu_backend(manifest, f"{backend.reason}; {backend.name} then failed: {e.message}")
        return cpu, open_engine(cpu)


def _per_layer(manifest) -> bool:
    """Whether the bundle's layers hold different tokens (per-layer caches): the step-graph path does not run those."""
    from edgeprune_runtime.manifest import per_layer_validity

    return per_layer_validity(manifest.shapes, manifest.skip_decode)


def _precision(data: dict) -> str:
    onnx_info = data.get("onnx")
    return onnx_info.get("precision", "fp32") if isinstance(onnx_info, dict) else "fp32"


def _refuse(message: str, status: Status = Status.DEVICE_UNSUPPORTED) -> RuntimeStatusError:
    return RuntimeStatusError(status, message)


def _gpu(backend: str) -> str:
    """GPU 0's compute capability; refusal naming why there is no GPU."""
    cc, why = compute_capability(0)
    if cc is None:
        raise _refuse(f"--backend {backend} needs an NVIDIA GPU: {why}; use --backend cpu")
    return cc


def _check_precision(precision: str, cc: str, backend: str) -> None:
    if precision in CPU_ONLY_PRECISIONS:
        raise _refuse(f"--backend {backend} cannot run this {precision.upper()} bundle: {CPU_ONLY_PRECISIONS[precision]}")
    if precision == "fp16" and cc_tuple(cc) < FP16_MIN_CC:
        raise _refuse(f"--backend {backend}: this GPU (compute capability {cc}) has no FP16 arithmetic (needs "
                      f"{'.'.join(map(str, FP16_MIN_CC))}+); export with --precision fp32 or use --backend cpu")


def _providers() -> list[str]:
    return list(ortlib.onnxruntime().get_available_providers())


def _preload_cuda_libraries() -> None:
    """onnxruntime-gpu >= 1.21 can load the CUDA/cuDNN libraries of NVIDIA's pip packages itself; older builds and
    JetPack's find them through the system's library path."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def cuda_device() -> str:
    """GPU 0's compute capability when ONNX Runtime's CUDA provider can use it; the refusal otherwise
    (before any bundle is read: `edgeprune bench --backend cuda` asks this first)."""
    providers = _providers()
    if CUDA_PROVIDER not in providers:
        dist = ", ".join(f"{n} {v}" for n, v in ortlib.installed_distributions()) or "onnxruntime"
        raise _refuse(f"--backend cuda needs onnxruntime-gpu, but {dist} has no CUDA provider (it has "
                      f"{', '.join(providers)}); pip uninstall -y onnxruntime && pip install 'edgeprune-runtime[cuda]'",
                      Status.DEPENDENCY_MISSING)
    return _gpu("cuda")


def cuda_backend(manifest, reason: str) -> Backend:
    cc = cuda_device()
    _check_precision(_precision(manifest.data), cc, "cuda")
    _preload_cuda_libraries()
    # the step graph: one LM session, so the weights are copied to the GPU once (bundles exported before it, and
    # bundles whose layers hold different tokens, which that path does not run yet: prefill + decode, two copies)
    lm = "step" if "step" in manifest.graphs and not _per_layer(manifest) else "prefill-decode"
    return Backend("cuda", "cuda", ((CUDA_PROVIDER, {"device_id": 0}),), f"{reason} (GPU compute capability {cc})", lm)


def trt_backend(manifest, reason: str) -> Backend:
    """The first engine set in the manifest that can run here; the refusal lists why each cannot."""
    entries = manifest.data.get("engines") or {}
    if not isinstance(entries, dict) or not entries:
        raise _refuse(f"--backend trt: the bundle has no TensorRT engines; run `edgeprune build {manifest.root} --target "
                      "TARGET` first, or use --backend cuda / cpu")
    why = []
    for target, entry in sorted(entries.items()):
        try:
            return _engine_backend(manifest, target, entry, reason)
        except RuntimeStatusError as e:
            why.append(e.message)
    raise _refuse("; ".join(why))


def _engine_backend(manifest, target: str, entry, reason: str) -> Backend:
    where = f"--backend trt: engines/{target}"
    if not isinstance(entry, dict) or entry.get("library") not in ENGINE_PROVIDERS or not isinstance(entry.get("engines"), dict):
        raise _refuse(f"{where} has a manifest entry this runtime does not know; rebuild with `edgeprune build`")
    provider, module = ENGINE_PROVIDERS[entry["library"]]
    rebuild = f"rebuild them here with `edgeprune build {manifest.root} --target {target}`"
    contexts = {name: e.get("context_file") for name, e in entry["engines"].items() if isinstance(e, dict)}
    if set(contexts) != {"vision", "lm"} or not all(isinstance(c, str) for c in contexts.values()):
        raise _refuse(f"{where} lack their EPContext wrapper models (built by an older edgeprune); {rebuild}")
    if provider not in _providers():
        raise _refuse(f"{where} need ONNX Runtime's {provider}, which the installed ONNX Runtime lacks; install an "
                      f"onnxruntime-gpu build with TensorRT (on a Jetson: JetPack's wheel)", Status.DEPENDENCY_MISSING)
    try:
        have = importlib.import_module(module).__version__
    except ImportError:
        raise _refuse(f"{where} were built with {entry['library']} {entry.get('version')}; this machine's version cannot "
                      f"be read (no `{module}` module): install its Python bindings", Status.DEPENDENCY_MISSING) from None
    built = str(entry.get("version", "?"))
    if have.split(".")[:2] != built.split(".")[:2]:
        raise _refuse(f"{where} were built with TensorRT {built}, this machine has {have}; engines run only on the "
                      f"TensorRT version that built them: {rebuild}")
    if _per_layer(manifest):
        raise _refuse(f"{where}: the trt backend does not run bundles whose layers hold different tokens (visual-token "
                      "dropping, SkipDecode) yet; use --backend cuda")
    cc = _gpu("trt")
    built_for = [str(c) for c in entry.get("compute_capabilities", [])]
    if cc not in built_for:
        raise _refuse(f"{where} were built for compute capability {'/'.join(built_for) or '?'}, this GPU is {cc}; "
                      f"build for a target that lists {cc}, or use --backend cuda")
    _check_precision(str(entry.get("precision", _precision(manifest.data))), cc, "trt")
    _preload_cuda_libraries()
    # TensorRT runs the engines; the CUDA provider takes nothing (the wrapper models are one EPContext node each)
    providers = ((provider, {"device_id": 0}), (CUDA_PROVIDER, {"device_id": 0}))
    return Backend("trt", "cuda", providers, f"{reason} ({entry['library']} {have}, compute capability {cc})", "step",
                   target, contexts)
