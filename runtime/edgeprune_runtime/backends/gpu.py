"""The GPU of this machine as the CUDA driver sees it (libcuda.so.1 comes with the NVIDIA driver, no toolkit)."""

from __future__ import annotations

import ctypes

# CUdevice_attribute
_CC_MAJOR, _CC_MINOR = 75, 76


def compute_capability(device: int = 0) -> tuple[str | None, str]:
    """("major.minor", "") of GPU `device`, or (None, why there is none). Never raises."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None, "no NVIDIA driver (libcuda.so.1) on this machine"
    if cuda.cuInit(0) != 0:
        return None, "the CUDA driver found no usable GPU (cuInit failed)"
    count = ctypes.c_int()
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value <= device:
        return None, "no CUDA GPU on this machine"
    major, minor = ctypes.c_int(), ctypes.c_int()
    if cuda.cuDeviceGetAttribute(ctypes.byref(major), _CC_MAJOR, device) != 0 or \
            cuda.cuDeviceGetAttribute(ctypes.byref(minor), _CC_MINOR, device) != 0:
        return None, "the CUDA driver did not report the GPU's compute capability"
    return f"{major.value}.{minor.value}", ""


def cc_tuple(cc: str) -> tuple[int, int]:
    major, _, minor = cc.partition(".")
    return int(major), int(minor or 0)
