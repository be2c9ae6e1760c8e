"""An OpenAI-compatible HTTP server for one bundle: `edgeprune serve BUNDLE` or, with the runtime alone,
`python -m edgeprune_runtime.server BUNDLE`.

    POST /v1/chat/completions   one user message (text + one image: data: URL or local path), streamed or not
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", "model", "slots": {"parallel", "busy", "waiting"}}

Starlette and uvicorn come with the `serve` extra (`pip install 'edgeprune-runtime[serve]'`); they are
imported only here, never by the rest of the runtime.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Callable

from edgeprune_runtime.errors import RuntimeStatusError, Status

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def serve(bundle_path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, model_name: str | None = None,
          parallel: int = 1, max_queue: int = 32, max_request_mb: int = 32, image_dir: str | None = ".",
          max_image_pixels: int | None = None, verify_hashes: bool = True, log_level: str = "warning",
          on_ready: Callable[[str], None] | None = None) -> None:
    """Loads the bundle, listens on host:port (0: a free port) and serves until SIGINT/SIGTERM.

    `on_ready` receives the one line saying where it listens (default: printed to stdout), once the socket
    is bound: connections made from then on are accepted. `image_dir` confines local image paths (None or
    "none": data URLs only). Raises RuntimeStatusError: DEPENDENCY_MISSING without starlette/uvicorn,
    INVALID_ARGUMENT for a bad option or an address that cannot be bound, the Bundle's errors."""
    try:
        import uvicorn

        from edgeprune_runtime.server.app import ServerOptions, create_app
    except ImportError as e:
        raise RuntimeStatusError(Status.DEPENDENCY_MISSING, f"serving needs starlette and uvicorn ({e}); "
                                 "pip install 'edgeprune-runtime[serve]' (or 'edgeprune[serve]')") from None
    from edgeprune_runtime.api import Bundle

    for name, value, low in (("parallel", parallel, 1), ("max_queue", max_queue, 0), ("max_request_mb", max_request_mb, 1),
                             ("port", port, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"{name} must be an integer >= {low}, got {value!r}")
    if port > 65535:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"port must be at most 65535, got {port}")
    root = None if image_dir in (None, "none") else Path(image_dir)
    if root is not None and not root.is_dir():
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"--image-dir {image_dir!r} is not a directory; pass an "
                                 "existing directory, or 'none' to accept data: URLs only")

    bundle = Bundle(bundle_path, verify_hashes=verify_hashes, max_image_pixels=max_image_pixels)
    try:
        name = model_name or Path(os.fspath(bundle_path)).resolve().name
        options = ServerOptions(model_name=name, parallel=parallel, max_queue=max_queue,
                                max_request_bytes=max_request_mb << 20, image_dir=root)
        sock = _listen(host, port)
        bound = sock.getsockname()
        url_host = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        (on_ready or _print)(f"serving {name!r} on http://{url_host}:{bound[1]} (OpenAI API at /v1, parallel {parallel}, "
                             f"images from {str(root.resolve()) if root else 'data: URLs only'})")
        config = uvicorn.Config(create_app(bundle, options), log_level=log_level, access_log=log_level in ("info", "debug"),
                                lifespan="off", timeout_graceful_shutdown=5)
        try:
            uvicorn.Server(config).run(sockets=[sock])  # returns after SIGINT/SIGTERM and a graceful shutdown
        except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled: the user asked to stop, not an error
            pass
    finally:
        bundle.close()


def _listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket (bound here rather than by uvicorn: a busy port is one `error:` line)."""
    sock = None
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as e:
        if sock is not None:
            sock.close()
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"cannot listen on {host}:{port}: "
                                 f"{e.strerror or e}; pick another --port (0: any free port) or --host") from None
    return sock


def _print(line: str) -> None:
    print(line, flush=True)
    sys.stdout.flush()
