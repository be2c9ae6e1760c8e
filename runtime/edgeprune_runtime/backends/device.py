"""Where a backend's buffers live, and the one copy the runtime does itself: a 2-D copy between two buffers.

Every buffer the runtime binds to a session is a `Buffer`: an ONNX Runtime OrtValue (what IO binding takes)
plus, on the host, a numpy array over the same memory. A device (`HOST`, or `CudaDevice` for GPU 0) makes
zeroed buffers once, at their final size, and copies a block of rows between two of them by address:

    copy2d(dst, dst_offset, dst_pitch, src, src_offset, src_pitch, width, rows)
        for r in range(rows): dst[dst_offset + r*dst_pitch : +width] = src[src_offset + r*src_pitch : +width]

That is all the KV cache needs (kvcache.py): a cache buffer is [Hkv, C, Dh], so one token's slot is Hkv rows of
Dh values, one every C*Dh; a run of n prefill slots is Hkv rows of n*Dh values. On the host the copy is a
numpy assignment between strided views built from the same addresses and pitches the GPU copy receives
(cudaMemcpy2DAsync, device to device), so the arithmetic the GPU path relies on is what the CPU tests run.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from edgeprune_runtime.errors import RuntimeStatusError, Status


@dataclass(frozen=True)
class Buffer:
    """One tensor the runtime owns: `value` is bound to sessions; `host` is the same memory as numpy (host only)."""

    value: object  # onnxruntime.OrtValue
    shape: tuple[int, ...]
    dtype: np.dtype
    host: np.ndarray | None = None

    @property
    def ptr(self) -> int:
        return int(self.value.data_ptr())

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class HostDevice:
    """Buffers in host memory (numpy arrays wrapped, not copied, by OrtValues)."""

    name = "cpu"  # ORT's device_type for IO binding
    device_id = 0

    def zeros(self, shape, dtype) -> Buffer:
        import onnxruntime as ort

        # np.zeros maps zero pages lazily: only slots ever written cost memory
        array = np.zeros(shape, dtype)
        return Buffer(ort.OrtValue.ortvalue_from_numpy(array), tuple(array.shape), array.dtype, array)

    def wrap(self, value) -> Buffer:
        """A Buffer for an OrtValue ORT allocated on this device (an IO binding's output)."""
        array = value.numpy()  # host OrtValues: a view of the same memory
        return Buffer(value, tuple(array.shape), array.dtype, array)

    def copy2d(self, dst: Buffer, dst_offset: int, dst_pitch: int, src: Buffer, src_offset: int, src_pitch: int,
               width: int, rows: int) -> None:
        """Byte offsets and pitches, as cudaMemcpy2D takes them; see the module docstring."""
        if not _copy_needed(dst, dst_offset, dst_pitch, src, src_offset, src_pitch, width, rows):
            return
        dst_rows = _strided_bytes(dst.ptr + dst_offset, dst_pitch, width, rows)
        src_rows = _strided_bytes(src.ptr + src_offset, src_pitch, width, rows)
        dst_rows[...] = src_rows

    def synchronize(self) -> None:
        pass


def _strided_bytes(address: int, pitch: int, width: int, rows: int) -> np.ndarray:
    """A [rows, width] uint8 view of the memory at `address`, one row every `pitch` bytes."""
    span = (rows - 1) * pitch + width
    flat = np.ctypeslib.as_array((ctypes.c_uint8 * span).from_address(address))
    return np.lib.stride_tricks.as_strided(flat, shape=(rows, width), strides=(pitch, 1))


def _copy_needed(dst: Buffer, dst_offset: int, dst_pitch: int, src: Buffer, src_offset: int, src_pitch: int,
                 width: int, rows: int) -> bool:
    """False for an empty copy; raises unless both spans lie inside their buffers (every device's copy2d)."""
    if rows <= 0 or width <= 0:
        return False
    _check_span(dst, dst_offset, dst_pitch, width, rows, "destination")
    _check_span(src, src_offset, src_pitch, width, rows, "source")
    return True


def _check_span(buf: Buffer, offset: int, pitch: int, width: int, rows: int, what: str) -> None:
    """A copy never reads or writes outside its buffer (a bug here would corrupt memory, not raise)."""
    if offset < 0 or pitch < width or offset + (rows - 1) * pitch + width > buf.nbytes:
        raise RuntimeStatusError(Status.INTERNAL_ERROR, f"copy2d {what} span [{offset}, rows {rows} x pitch {pitch}, width "
                                 f"{width}) leaves its {buf.nbytes}-byte buffer (a bug in edgeprune_runtime)")


HOST = HostDevice()


# --- CUDA ------------------------------------------------------------------------------------------------------

CUDART_NAMES = ("libcudart.so.13", "libcudart.so.12", "libcudart.so")  # after onnxruntime.preload_dlls() one is loaded
MEMCPY_DEVICE_TO_DEVICE = 3  # cudaMemcpyKind


class CudaDevice:
    """Buffers in GPU memory (device 0), allocated by ONNX Runtime's CUDA allocator; copies through the CUDA
    runtime library that onnxruntime-gpu itself loads (libcudart), on the legacy default stream, then synchronized:
    ORT's Run has finished with its outputs when it returns, and the next Run must see the copied slots."""

    name = "cuda"

    def __init__(self, device_id: int = 0):
        self.device_id = device_id
        self.cudart = load_cudart()

    def zeros(self, shape, dtype) -> Buffer:
        import onnxruntime as ort

        dtype = np.dtype(dtype)
        value = ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype.type, "cuda", self.device_id)
        buf = Buffer(value, tuple(int(d) for d in shape), dtype)
        # cache slots past the valid ones are masked, but 0 x NaN is NaN: never leave garbage in them
        self._call("cudaMemset", ctypes.c_void_p(buf.ptr), 0, ctypes.c_size_t(buf.nbytes))
        self.synchronize()  # cudaMemset may return before it is done; ORT's own stream must see zeros
        return buf

    def wrap(self, value) -> Buffer:
        return Buffer(value, tuple(value.shape()), np.dtype(_ORT_TYPES[value.data_type()]))

    def copy2d(self, dst: Buffer, dst_offset: int, dst_pitch: int, src: Buffer, src_offset: int, src_pitch: int,
               width: int, rows: int) -> None:
        if not _copy_needed(dst, dst_offset, dst_pitch, src, src_offset, src_pitch, width, rows):
            return
        self._call("cudaMemcpy2DAsync", ctypes.c_void_p(dst.ptr + dst_offset), ctypes.c_size_t(dst_pitch),
                   ctypes.c_void_p(src.ptr + src_offset), ctypes.c_size_t(src_pitch), ctypes.c_size_t(width),
                   ctypes.c_size_t(rows), MEMCPY_DEVICE_TO_DEVICE, ctypes.c_void_p(0))

    def synchronize(self) -> None:
        self._call("cudaStreamSynchronize", ctypes.c_void_p(0))

    def _call(self, fn: str, *args) -> None:
        code = getattr(self.cudart, fn)(*args)
        if code != 0:
            self.cudart.cudaGetErrorString.restype = ctypes.c_char_p
            why = self.cudart.cudaGetErrorString(code).decode(errors="replace")
            raise RuntimeStatusError(Status.INFERENCE_FAILED, f"CUDA {fn} failed: {why} (error {code})")


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
              "tensor(int32)": np.int32, "tensor(double)": np.float64}


def gpu_memory_used(device_id: int = 0) -> int:
    """Bytes in use on GPU `device_id` (total - free, every process's), through the CUDA runtime."""
    cudart = load_cudart()
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    if cudart.cudaSetDevice(device_id) != 0 or cudart.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)) != 0:
        raise RuntimeStatusError(Status.INFERENCE_FAILED, "cudaMemGetInfo failed")
    return total.value - free.value


def load_cudart():
    """The CUDA runtime library; DEPENDENCY_MISSING naming the extra when none can be loaded."""
    errors = []
    for name in CUDART_NAMES:
        try:
            return ctypes.CDLL(name)
        except OSError as e:
            errors.append(str(e).splitlines()[0] if str(e) else name)
    raise RuntimeStatusError(Status.DEPENDENCY_MISSING, f"the CUDA runtime library (libcudart) cannot be loaded ({errors[0]}); "
                             "pip install 'edgeprune-runtime[cuda]' brings it with onnxruntime-gpu")
