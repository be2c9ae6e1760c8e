"""Running a built engine, for `compare --backends trt`: where can it run, and a Polygraphy runner for it.

Polygraphy's own TrtRunner imports classic `tensorrt` only, so this runner is written against the
API that classic TensorRT (10+) and TensorRT-RTX share: `Runtime.deserialize_cuda_engine`,
`create_execution_context`, `set_optimization_profile_async`, `set_input_shape`,
`set_tensor_address`, `execute_async_v3`, with device buffers from torch (CUDA). No machine we test
on can execute an engine (TensorRT-RTX refuses compute capability 9.0, the only GPU we have), so
this path is verified only where the README says.
"""

from __future__ import annotations

import time
from collections import OrderedDict

import numpy as np

from edgeprune.trt.targets import Target


def gpu_compute_capability() -> tuple[str | None, str]:
    """("major.minor", "") of GPU 0 through the CUDA driver API, or (None, why not): the runtime's probe."""
    from edgeprune_runtime.backends.gpu import compute_capability

    return compute_capability(0)


def engine_runnable(target: Target) -> tuple[bool, str]:
    """Whether `target`'s engines can execute here, and the reason when they cannot."""
    from edgeprune.errors import MissingDependencyError
    from edgeprune.trt.library import import_library

    try:
        import_library(target)
    except MissingDependencyError as e:
        return False, str(e)
    cc, why = gpu_compute_capability()
    if cc is None:
        return False, f"{target.name} engines need an NVIDIA GPU of compute capability {'/'.join(target.compute_capabilities)}: {why}"
    if cc not in target.compute_capabilities:
        return False, (f"this GPU has compute capability {cc}; {target.name} engines run on "
                       f"{'/'.join(target.compute_capabilities)} only")
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "torch has no CUDA here (device buffers for the engine come from torch)"
    except ImportError:
        return False, "torch is not installed"
    return True, ""


def engine_runner(trt, engine_bytes: bytes, name: str, profile: int = 0):
    """A Polygraphy runner executing a serialized engine with one optimization profile."""
    import torch
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class EngineRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name, prefix="trt")

        def activate_impl(self):
            self.engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(engine_bytes)
            if self.engine is None:
                raise RuntimeError("TensorRT refused to deserialize the engine here")
            self.context = self.engine.create_execution_context()
            self.stream = torch.cuda.Stream()
            self.context.set_optimization_profile_async(profile, self.stream.cuda_stream)
            names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
            self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
            self.outputs = [n for n in names if n not in self.inputs]

        def deactivate_impl(self):
            del self.context, self.engine

        def get_input_metadata_impl(self):
            meta = TensorMetadata()
            for n in self.inputs:
                shape = tuple(self.engine.get_tensor_profile_shape(n, profile)[1]) if -1 in tuple(self.engine.get_tensor_shape(n)) \
                    else tuple(self.engine.get_tensor_shape(n))
                meta.add(n, trt.nptype(self.engine.get_tensor_dtype(n)), shape)
            return meta

        def infer_impl(self, feed_dict):
            keep = []
            for n in self.inputs:
                array = np.ascontiguousarray(feed_dict[n].astype(trt.nptype(self.engine.get_tensor_dtype(n))))
                buf = torch.from_numpy(array).cuda()
                keep.append(buf)
                self.context.set_input_shape(n, array.shape)
                self.context.set_tensor_address(n, buf.data_ptr())
            outs = {}
            for n in self.outputs:
                shape = tuple(self.context.get_tensor_shape(n))
                dtype = torch.from_numpy(np.zeros(0, trt.nptype(self.engine.get_tensor_dtype(n)))).dtype
                outs[n] = torch.empty(shape, dtype=dtype, device="cuda")
                self.context.set_tensor_address(n, outs[n].data_ptr())
            start = time.perf_counter()
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise RuntimeError("execute_async_v3 failed")
            self.stream.synchronize()
            self.inference_time = time.perf_counter() - start
            return OrderedDict((n, outs[n].cpu().numpy()) for n in self.outputs)

    return EngineRunner()
