"""edgeprune_runtime: run an edgeprune bundle (ONNX Runtime, fixed-size KV cache) without PyTorch.

    from edgeprune_runtime import Bundle
    with Bundle("export/tiny") as bundle:
        print(bundle.generate("cam.png", "What is on the table?").text)

`capi` is the C-API-shaped layer (handles, statuses, out-parameters) under this wrapper.
"""

from edgeprune_runtime.api import Bundle, Generator, Result
from edgeprune_runtime.errors import RuntimeStatusError, Status

__all__ = ["Bundle", "Generator", "Result", "RuntimeStatusError", "Status"]
__version__ = "0.1.0"
