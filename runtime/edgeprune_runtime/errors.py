"""Status codes of the C-API-shaped runtime and the one exception its Python wrapper raises."""

from __future__ import annotations

import enum


class Status(enum.IntEnum):
    """Every runtime call returns one of these; OK is 0 as in a C API."""

    OK = 0
    INVALID_ARGUMENT = 1  # bad handle, bad option value
    BUNDLE_INVALID = 2  # manifest missing/malformed/unknown schema, file hash mismatch
    IMAGE_INVALID = 3  # missing, unreadable or corrupt image
    PROMPT_TOO_LONG = 4  # prompt does not fit the static text slots
    CACHE_FULL = 5  # KV cache capacity reached (also a normal stop reason of generation)
    DEPENDENCY_MISSING = 6  # optional package (e.g. tensorrt) not installed
    INFERENCE_FAILED = 7  # the execution provider raised, or a graph produced non-finite logits
    RESOURCE_LIMIT = 8  # the bundle or image needs more memory than the budget (EDGEPRUNE_MEMORY_BUDGET_MB)
    OUTPUT_FAILED = 9  # the command line could not write its answer (closed pipe, full disk)
    INTERNAL_ERROR = 10  # a bug in the runtime, never an answer to bad input; the message names the exception
    DEVICE_UNSUPPORTED = 11  # the backend asked for cannot run here: no GPU, no GPU build of ONNX Runtime, engines
    #                          for another TensorRT or compute capability, a precision the device cannot run


class RuntimeStatusError(Exception):
    """Raised by the Pythonic wrapper when a runtime call returns a non-OK status."""

    def __init__(self, status: Status, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def bundle_invalid(message: str) -> RuntimeStatusError:
    """The error for a bundle that is missing, malformed or does not match its manifest."""
    return RuntimeStatusError(Status.BUNDLE_INVALID, message)
