"""`python -m edgeprune_runtime.server BUNDLE [--host H] [--port N] [...]`: the server without the toolchain."""

from __future__ import annotations

import sys

from edgeprune_runtime.cli import EXIT_USER_ERROR, VersionAction, _OneLineParser, _report
from edgeprune_runtime.errors import RuntimeStatusError
from edgeprune_runtime.server import DEFAULT_HOST, DEFAULT_PORT, serve


def build_parser() -> _OneLineParser:
    p = _OneLineParser(prog="python -m edgeprune_runtime.server",
                       description="Serve an edgeprune bundle over an OpenAI-compatible HTTP API (/v1/chat/completions).")
    p.add_argument("bundle", help="bundle directory (holds manifest.json)")
    add_server_options(p)
    p.add_argument("--version", action=VersionAction)
    return p


def add_server_options(p) -> None:
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}: this machine only)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0: any free port)")
    p.add_argument("--model-name", help="the model id clients send (default: the bundle directory's name)")
    p.add_argument("--parallel", type=int, default=1, help="requests generating at once (default 1)")
    p.add_argument("--max-queue", type=int, default=32, help="requests waiting for a slot before 503 (default 32)")
    p.add_argument("--max-request-mb", type=int, default=32, help="largest request body in MiB (default 32)")
    p.add_argument("--image-dir", default=".", help="local image paths are read only inside this directory "
                   "(default: the current one; 'none': data: URLs only)")
    p.add_argument("--max-image-pixels", type=int, help="refuse larger images (default: EDGEPRUNE_MAX_IMAGE_PIXELS or 100M)")
    p.add_argument("--skip-hash-check", action="store_true", help="do not verify the bundle files' sha256 (faster start)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (info and debug also log every request)")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        serve(args.bundle, args.host, args.port, model_name=args.model_name, parallel=args.parallel,
              max_queue=args.max_queue, max_request_mb=args.max_request_mb, image_dir=args.image_dir,
              max_image_pixels=args.max_image_pixels, verify_hashes=not args.skip_hash_check, log_level=args.log_level)
    except RuntimeStatusError as e:
        _report(f"error: {e.message}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
