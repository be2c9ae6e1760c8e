"""Backends: the choice and its refusals (backends/select.py), the device copies (backends/device.py), and the
decode loop with the cache behind opaque device buffers, all on this CPU-only machine.

The GPU path differs from what runs here only in where buffers live: `OpaqueDevice` below gives the cache no
numpy view, as on a GPU, so the tokens it produces show the loop touches the cache only through bindings and
2-D copies. Expected tokens come from the fake bundle's numpy twin (test_generator.reference).
"""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeprune_runtime.backends import select as backends
from edgeprune_runtime.backends.device import HOST, Buffer, HostDevice
from edgeprune_runtime.cli import main
from edgeprune_runtime.errors import RuntimeStatusError, Status
from edgeprune_runtime.generator import Generator, GeneratorParams, LoadedBundle
from edgeprune_runtime.manifest import load_manifest
from fake_bundle import set_manifest
from test_cli import _one_error_line, _runtime
from test_generator import PROMPT, no_eos, reference

# --- host copy2d against numpy slicing of the same bytes ----------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 5), width=st.integers(1, 24), extra_dst=st.integers(0, 16), extra_src=st.integers(0, 16),
       dst_off=st.integers(0, 16), src_off=st.integers(0, 16), seed=st.integers(0, 2**16))
def test_copy2d_moves_exactly_the_rows_it_names(rows, width, extra_dst, extra_src, dst_off, src_off, seed):
    rng = np.random.default_rng(seed)
    dpitch, spitch = width + extra_dst, width + extra_src
    dst = HOST.zeros((dst_off + rows * dpitch,), np.uint8)
    src = HOST.zeros((src_off + rows * spitch,), np.uint8)
    src.host[:] = rng.integers(1, 256, src.host.shape)
    expected = dst.host.copy()
    for r in range(rows):  # the reference: one row at a time, plain slicing
        expected[dst_off + r * dpitch: dst_off + r * dpitch + width] = src.host[src_off + r * spitch: src_off + r * spitch + width]
    HOST.copy2d(dst, dst_off, dpitch, src, src_off, spitch, width, rows)
    np.testing.assert_array_equal(dst.host, expected)


def test_copy2d_refuses_a_span_outside_its_buffer():
    dst, src = HOST.zeros((2, 8), np.float32), HOST.zeros((2, 8), np.float32)
    with pytest.raises(RuntimeStatusError) as e:
        HOST.copy2d(dst, 4, 32, src, 0, 32, 32, 2)  # second row would end 4 bytes past the end
    assert e.value.status == Status.INTERNAL_ERROR


# --- the decode loop on buffers without host views (what a GPU cache is) -------------------------------------------


class OpaqueDevice(HostDevice):
    """Host memory, but Buffers without numpy views: any code reading the cache as numpy fails."""

    def zeros(self, shape, dtype):
        b = super().zeros(shape, dtype)
        self._keep = getattr(self, "_keep", []) + [b.host]  # the memory must outlive the Buffer
        return Buffer(b.value, b.shape, b.dtype)

    def wrap(self, value):
        b = super().wrap(value)
        return Buffer(b.value, b.shape, b.dtype)


@pytest.mark.parametrize("image", ["wide", "tall"])
def test_tokens_with_the_cache_behind_device_buffers(fake_bundle, images, image):
    root, lm = fake_bundle
    no_eos(root)
    bundle = LoadedBundle(root, backend="cpu")
    bundle.engine.device = OpaqueDevice()
    gen = Generator(bundle, GeneratorParams(max_new_tokens=8), images[image], PROMPT)
    assert gen.cache.key_buffers[0].host is None
    with pytest.raises(RuntimeStatusError):
        gen.cache.keys  # no numpy view of a device cache
    tokens = [gen.generate_next_token() for _ in range(8)]
    assert tokens == reference(root, lm, images[image], 8)[0]
    assert len(set(tokens)) > 3


# --- choosing a backend ----------------------------------------------------------------------------------------


def _manifest(root):
    return load_manifest(root, verify_hashes=False)


def _refusal(requested, root, status=None) -> str:
    with pytest.raises(RuntimeStatusError) as e:
        backends.select(requested, _manifest(root))
    if status is not None:
        assert e.value.status == status, e.value.message
    assert "\n" not in e.value.message
    return e.value.message


def test_cuda_without_onnxruntime_gpu_names_the_extra(fake_bundle):
    root, _ = fake_bundle  # this machine: CPU-only onnxruntime
    msg = _refusal("cuda", root, Status.DEPENDENCY_MISSING)
    assert "onnxruntime-gpu" in msg and "edgeprune-runtime[cuda]" in msg


@pytest.fixture
def gpu_build(monkeypatch):
    """Pretends the GPU build of ONNX Runtime (with the TensorRT provider) is installed; the GPU is set per test."""
    monkeypatch.setattr(backends, "_providers", lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider",
                                                          "CPUExecutionProvider"])
    monkeypatch.setattr(backends, "_preload_cuda_libraries", lambda: None)

    def gpu(cc, why="no NVIDIA driver (libcuda.so.1) on this machine"):
        monkeypatch.setattr(backends, "compute_capability", lambda device=0: (cc, "" if cc else why))

    return gpu


def test_cuda_without_a_gpu(fake_bundle, gpu_build):
    gpu_build(None)
    msg = _refusal("cuda", _root := fake_bundle[0], Status.DEVICE_UNSUPPORTED)
    assert "needs an NVIDIA GPU" in msg and "libcuda" in msg and "--backend cpu" in msg


@pytest.mark.parametrize("precision, cc, words", [("fp16", "5.2", "no FP16"), ("int8", "9.0", "DynamicQuantizeLinear")])
def test_cuda_refuses_a_precision_the_device_cannot_run(fake_bundle, gpu_build, precision, cc, words):
    root, _ = fake_bundle
    set_manifest(root, onnx={"precision": precision})
    gpu_build(cc)
    assert words in _refusal("cuda", root, Status.DEVICE_UNSUPPORTED)


def test_cuda_chosen_with_a_gpu(fake_bundle, gpu_build):
    root, _ = fake_bundle
    gpu_build("9.0")
    for requested in ("cuda", "auto"):  # auto: no engines, so CUDA
        b = backends.select(requested, _manifest(root))
        assert (b.name, b.device, b.providers[0][0]) == ("cuda", "cuda", "CUDAExecutionProvider")
        assert b.lm == "prefill-decode"  # the fake bundle has no step graph (a real export has: then "step")
    assert "no TensorRT engines" in backends.select("auto", _manifest(root)).reason


def _engines(root, **entry):
    """An engines entry as `edgeprune build` writes it, its files present and hashed (the runtime checks them)."""
    (root / "engines" / "orin").mkdir(parents=True, exist_ok=True)
    data = json.loads((root / "manifest.json").read_text())
    for name in ("vision.engine", "vision.ctx.onnx", "lm.engine", "lm.ctx.onnx"):
        (root / "engines" / "orin" / name).write_bytes(name.encode())
        data["files"][f"engines/orin/{name}"] = hashlib.sha256(name.encode()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(data))
    e = {"library": "tensorrt", "version": "10.3.0", "compute_capabilities": ["8.7"], "precision": "fp16",
         "engines": {"vision": {"file": "engines/orin/vision.engine", "context_file": "engines/orin/vision.ctx.onnx"},
                     "lm": {"file": "engines/orin/lm.engine", "context_file": "engines/orin/lm.ctx.onnx"}}}
    set_manifest(root, engines={"orin": e | entry})


@pytest.fixture
def tensorrt_version(monkeypatch):
    def have(version):
        fake = type(sys)("tensorrt")
        fake.__version__ = version
        monkeypatch.setitem(sys.modules, "tensorrt", fake)

    return have


def test_trt_refusals_name_the_mismatch(fake_bundle, gpu_build, tensorrt_version):
    root, _ = fake_bundle
    assert "edgeprune build" in _refusal("trt", root, Status.DEVICE_UNSUPPORTED)  # no engines at all
    _engines(root)
    gpu_build("8.7")
    tensorrt_version("8.6.2")
    msg = _refusal("trt", root, Status.DEVICE_UNSUPPORTED)
    assert "built with TensorRT 10.3.0, this machine has 8.6.2" in msg and "edgeprune build" in msg
    tensorrt_version("10.3.1")
    gpu_build("9.0")
    msg = _refusal("trt", root, Status.DEVICE_UNSUPPORTED)
    assert "compute capability 8.7, this GPU is 9.0" in msg
    gpu_build("8.7")
    b = backends.select("trt", _manifest(root))
    assert (b.name, b.target, b.providers[0][0]) == ("trt", "orin", "TensorrtExecutionProvider")
    assert b.engines == {"vision": "engines/orin/vision.ctx.onnx", "lm": "engines/orin/lm.ctx.onnx"}
    assert backends.select("auto", _manifest(root)).name == "trt"


def test_trt_engines_without_wrapper_models_are_refused(fake_bundle, gpu_build, tensorrt_version):
    root, _ = fake_bundle
    _engines(root, engines={"vision": {"file": "engines/orin/vision.engine"}, "lm": {"file": "engines/orin/lm.engine"}})
    gpu_build("8.7")
    tensorrt_version("10.3.0")
    assert "EPContext wrapper" in _refusal("trt", root)


def test_auto_here_is_cpu_and_says_why(fake_bundle):
    root, _ = fake_bundle
    _engines(root)
    b = backends.select("auto", _manifest(root))
    assert b.name == "cpu" and b.providers == ("CPUExecutionProvider",)
    assert "TensorrtExecutionProvider" in b.reason and "onnxruntime-gpu" in b.reason


def test_unknown_backend(fake_bundle):
    assert "auto, cpu, cuda, trt" in _refusal("tpu", fake_bundle[0], Status.INVALID_ARGUMENT)


# --- the command line ------------------------------------------------------------------------------------------


def test_cpu_and_auto_give_the_same_tokens_and_say_cpu(fake_bundle, images, capsys):
    root, _ = fake_bundle
    no_eos(root)
    results = []
    for backend in ("cpu", "auto"):
        assert main([str(root), "--image", str(images["wide"]), "--prompt", PROMPT, "--json", "--max-new-tokens", "6",
                     "--backend", backend]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["token_ids"] == results[1]["token_ids"] and len(results[0]["token_ids"]) == 6
    assert results[0]["backend"] == results[1]["backend"] == "cpu"
    assert results[0]["backend_reason"] == "asked for" and "onnxruntime-gpu" in results[1]["backend_reason"]


@pytest.mark.parametrize("backend, words", [("cuda", "onnxruntime-gpu"), ("trt", "edgeprune build")])
def test_gpu_backends_fail_here_with_one_line(fake_bundle, images, backend, words):
    root, _ = fake_bundle
    proc = _runtime([str(root), "--image", str(images["wide"]), "--prompt", "x", "--backend", backend])
    _one_error_line(proc, words)
    assert proc.stdout == b""


def test_bundle_reports_its_backend(fake_bundle):
    from edgeprune_runtime import Bundle

    with Bundle(fake_bundle[0], backend="cpu") as b:
        assert b.backend == {"backend": "cpu", "reason": "asked for", "target": None}
    with pytest.raises(RuntimeStatusError) as e:
        Bundle(fake_bundle[0], backend="cuda")
    assert e.value.status == Status.DEPENDENCY_MISSING


def test_edgeprune_run_has_the_backend_option(fake_bundle, images):
    root, _ = fake_bundle
    proc = subprocess.run([sys.executable, "-m", "edgeprune", "run", str(root), "--image", str(images["wide"]),
                           "--prompt", "x", "--backend", "cuda"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "onnxruntime-gpu" in proc.stderr


def test_capi_backend_argument_and_getter(fake_bundle):
    from edgeprune_runtime import capi

    out = capi.Out()
    assert capi.Bundle_Create(str(fake_bundle[0]), out, backend=3) == Status.INVALID_ARGUMENT
    assert "backend must be a str" in capi.GetLastError()
    assert capi.Bundle_Create(str(fake_bundle[0]), out, backend="tpu") == Status.INVALID_ARGUMENT
    assert out.value is None
    assert capi.Bundle_Create(str(fake_bundle[0]), out, backend="auto") == Status.OK
    got = capi.Out()
    assert capi.Bundle_GetBackend(out.value, got) == Status.OK and got.value["backend"] == "cpu"
    assert got.value["reason"].startswith("auto: ")
    assert capi.Bundle_Destroy(out.value) == Status.OK
    assert capi.Bundle_GetBackend(out.value, got) == Status.INVALID_ARGUMENT


def test_bundles_with_per_layer_caches_take_the_prefill_decode_path(fake_bundle, gpu_build, tensorrt_version, monkeypatch):
    """The step-graph path runs bundles whose layers hold the same tokens only: cuda falls back to prefill + decode,
    trt refuses by name."""
    root, _ = fake_bundle
    gpu_build("8.7")
    monkeypatch.setattr(backends, "_per_layer", lambda manifest: True)
    assert backends.select("cuda", _manifest(root)).lm == "prefill-decode"
    _engines(root)
    tensorrt_version("10.3.0")
    assert "layers hold different tokens" in _refusal("trt", root, Status.DEVICE_UNSUPPORTED)


def test_a_gpu_backend_refuses_a_graph_its_provider_cannot_run(fake_bundle):
    """CPU fallback is disabled on GPU backends: a node left to the CPU is a named refusal, not a host round trip.
    Here the "GPU" backend's only provider is the CPU's, so every node would fall back."""
    from edgeprune_runtime.backends.select import Backend
    from edgeprune_runtime.engine import open_session, session_options

    root, _ = fake_bundle
    no_gpu = Backend("cuda", "cuda", ("CPUExecutionProvider",), "test")
    with pytest.raises(RuntimeStatusError) as e:
        open_session(root / "lm" / "decode.onnx", session_options(), "decode", no_gpu)
    assert e.value.status == Status.DEVICE_UNSUPPORTED and "\n" not in e.value.message
    assert e.value.message.startswith("the cuda backend cannot run the decode graph decode.onnx") and "--backend cpu" in e.value.message
    assert open_session(root / "lm" / "decode.onnx", session_options(), "decode") is not None  # the CPU backend runs it


def test_auto_falls_back_to_cpu_when_gpu_sessions_cannot_be_made(fake_bundle, gpu_build):
    """auto chose cuda (a GPU build and a GPU, pretended), but its sessions cannot be made here (no CUDA runtime
    library, or no CUDA provider to take the nodes, depending on the machine): the CPU takes over and says why;
    `--backend cuda` asked by name fails with that one line instead."""
    root, lm = fake_bundle
    gpu_build("9.0")
    bundle = LoadedBundle(root)  # auto
    assert bundle.backend.name == "cpu" and "cuda then failed" in bundle.backend.reason
    assert Generator(bundle, GeneratorParams(max_new_tokens=2), fake_bundle_image(root), PROMPT).generate_next_token() >= 0
    with pytest.raises(RuntimeStatusError) as e:
        LoadedBundle(root, backend="cuda")
    assert e.value.status in (Status.DEPENDENCY_MISSING, Status.DEVICE_UNSUPPORTED) and "\n" not in e.value.message
    assert e.value.message in bundle.backend.reason


def fake_bundle_image(root):
    from PIL import Image

    path = root.parent / "cam.png"
    Image.new("RGB", (40, 30), (120, 30, 200)).save(path)
    return path
