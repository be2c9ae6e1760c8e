"""Backends: where the bundle runs (CPU, a CUDA GPU, TensorRT engines) — one execution path, ONNX Runtime, for all.

    select.py   which backend a request gets (`auto|cpu|cuda|trt`) and why, and every refusal by name
    device.py   buffers on the host or the GPU, and the 2-D copy that writes the KV cache in place
    gpu.py      the GPU's compute capability, through the CUDA driver (no CUDA toolkit needed)

The backends differ only in the execution providers of the sessions and in where buffers live; IO binding,
the cache and the decode loop are the same code (engine.py, kvcache.py). README "GPU backends" says why ONNX
Runtime runs the TensorRT engines too.
"""
