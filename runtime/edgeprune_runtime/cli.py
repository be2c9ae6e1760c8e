"""`python -m edgeprune_runtime BUNDLE --image IMG --prompt TEXT`: one answer, streamed to stdout.

Every RuntimeStatusError becomes `error: <message>` on stderr and exit code 2, no traceback; a closed or
full stdout (`... | head -c 10`, a full disk) is one of them (OUTPUT_FAILED).
`run()` is the reusable part (the toolchain's `edgeprune run` calls it); `main()` adds argparse.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
from typing import TextIO

from edgeprune_runtime.api import Bundle, Result
from edgeprune_runtime.backends.select import BACKENDS
from edgeprune_runtime.errors import RuntimeStatusError, Status

EXIT_USER_ERROR = 2


MAX_TURNS_BYTES = 16 << 20


def read_turns(path) -> list[str]:
    """The follow-up questions of a `--turns` file: JSON Lines, one {"prompt": "..."} per non-empty line.

    Raises RuntimeStatusError(INVALID_ARGUMENT) naming the file and line when it is missing or not such JSONL."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_TURNS_BYTES + 1)
    except OSError as e:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"cannot read --turns file {path}: {e.strerror}") from None
    if len(data) > MAX_TURNS_BYTES:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"--turns file {path} is over {MAX_TURNS_BYTES} bytes")
    prompts = []
    for n, line in enumerate(data.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: nesting too deep
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"--turns file {path} line {n} is not JSON ({e}); write one "
                                     '{"prompt": "..."} per line (JSON Lines)') from None
        if not isinstance(item, dict) or set(item) != {"prompt"} or not isinstance(item["prompt"], str):
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"--turns file {path} line {n} must be an object with one "
                                     'string key "prompt", e.g. {"prompt": "What color is it?"}')
        prompts.append(item["prompt"])
    return prompts


def run(bundle_path, image, prompt: str, *, max_new_tokens: int = 32, raw_prompt: bool = False,
        temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, as_json: bool = False,
        verify_hashes: bool = True, ignore_eos: bool = False, exact_boundary: bool = False,
        turns: list[str] | None = None, interactive: bool = False, backend: str = "auto", cache_policy: str | None = None,
        cache_sinks: int | None = None, cache_pin_image: bool | None = None, stdin: TextIO | None = None,
        stdout: TextIO | None = None, stderr: TextIO | None = None) -> Result:
    """Loads the bundle on `backend` (auto, cpu, cuda, trt), answers `prompt`, then each follow-up of `turns` and, with
    `interactive`, each line read from stdin (until end of input), all in one conversation (Bundle.chat: the image is
    seen once). Prints per answer the text as it comes (plus a summary line on stderr), or with `as_json` one JSON
    object per line (with "backend_reason": why that backend, "cache_policy" and "evicted_slots"). The cache options
    (None: the bundle's default) say what a full KV cache does (README "Cache policies"). Returns the last Result.
    Raises RuntimeStatusError."""
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    stdin = stdin or sys.stdin

    def stream(text: str) -> None:
        _write(stdout, text)

    why = ""  # the backend's reason (auto: what it skipped and why), known once the bundle is loaded

    def show(result: Result) -> None:
        if as_json:
            _write(stdout, json.dumps(result.to_dict() | {"backend_reason": why}) + "\n")
            return
        _write(stdout, "\n")  # flushed: the answer before the summary line when both go to one terminal
        rate = f"{result.decode_tokens_per_s:.1f} tokens/s" if result.decode_tokens_per_s is not None else "- tokens/s"
        evicted = f", {result.cache_policy}: {result.evicted_slots} slots evicted" if result.cache_policy != "stop" else ""
        _write(stderr, f"[{result.backend}: {len(result.token_ids)} tokens, stop: {result.stop_reason}{evicted}, "
                       f"{result.visual_tokens} visual tokens, "
                       f"ttft {result.ttft_s:.3f} s, {rate}]\n")

    options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                   ignore_eos=ignore_eos, on_text=None if as_json else stream)
    with Bundle(bundle_path, verify_hashes=verify_hashes, backend=backend, cache_policy=cache_policy,
                cache_sinks=cache_sinks, cache_pin_image=cache_pin_image) as bundle:
        why = bundle.backend["reason"]
        if not turns and not interactive:
            result = bundle.generate(image, prompt, raw_prompt=raw_prompt, exact_boundary=exact_boundary, **options)
            show(result)
            return result
        with bundle.chat(image) as chat:
            result = chat.ask(prompt, raw_prompt=raw_prompt, exact_boundary=exact_boundary, **options)
            show(result)
            for follow_up in turns or []:
                result = chat.ask(follow_up, **options)
                show(result)
            while interactive:
                if stdin.isatty():
                    _write(stderr, "> ")
                line = stdin.readline()
                if not line:
                    break
                if line.strip():
                    result = chat.ask(line.strip(), **options)
                    show(result)
    return result


def _write(stream: TextIO, text: str) -> None:
    """Writes and flushes; a closed pipe or full disk becomes RuntimeStatusError(OUTPUT_FAILED).

    After a failure on the process's own stdout/stderr, that descriptor is pointed at /dev/null, so the
    interpreter's final flush cannot print a second error (the Python documentation's advice for SIGPIPE)."""
    try:
        stream.write(text)
        stream.flush()
    except (OSError, ValueError) as e:  # ValueError: the stream was closed
        why = ("the reader closed the pipe" if isinstance(e, BrokenPipeError)
               else os.strerror(e.errno) if isinstance(e, OSError) and e.errno else str(e))
        name = getattr(stream, "name", "the output")
        if stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stream.fileno())
                os.close(devnull)
            except (OSError, ValueError):
                pass
        status_errno = getattr(e, "errno", None)
        hint = "; free disk space" if status_errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
        raise RuntimeStatusError(Status.OUTPUT_FAILED, f"cannot write to {name}: {why}{hint}") from None


class VersionAction(argparse.Action):
    """--version: this runtime's version and the ONNX Runtime it found (computed only when asked)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the version and the ONNX Runtime in use, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        from edgeprune_runtime import __version__
        from edgeprune_runtime.ortlib import version_line

        try:
            _write(sys.stdout, version_line("edgeprune-runtime", __version__) + "\n")  # stdout, as argparse's own
        except RuntimeStatusError:  # a closed pipe: nothing left to say
            pass
        parser.exit(0)


class _OneLineParser(argparse.ArgumentParser):
    """A usage error is one `error:` line (argparse would print the usage block first)."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="python -m edgeprune_runtime",
                                description="Answer a prompt about an image with an edgeprune bundle (ONNX Runtime, no PyTorch).")
    p.add_argument("bundle", help="bundle directory (holds manifest.json)")
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    p.add_argument("--prompt", required=True, help="question; the bundle's chat template is applied unless --raw-prompt")
    p.add_argument("--max-new-tokens", type=int, default=32, help="stop after N tokens; 0 = until EOS or the cache is full (default 32)")
    p.add_argument("--raw-prompt", action="store_true", help="use --prompt verbatim (it must contain <image> once)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument("--ignore-eos", action="store_true", help="go on past EOS until --max-new-tokens or a full cache")
    p.add_argument("--exact-boundary", action="store_true",
                   help="finish a prompt that ends mid-word or with a space from exact next-byte probabilities")
    p.add_argument("--turns", metavar="FILE", help='follow-up questions, JSON Lines {"prompt": "..."}, asked after '
                   "--prompt in one conversation (the image is seen once)")
    p.add_argument("--interactive", action="store_true", help="after the answer(s), read follow-up questions from stdin")
    p.add_argument("--cache-policy", help="when the KV cache is full: stop, sink-window or heavy-hitter (evict in place "
                   "and go on); default: the bundle's")
    p.add_argument("--cache-sinks", type=int, help="first cache slots never evicted (default: the bundle's, 4)")
    p.add_argument("--cache-pin-image", action=argparse.BooleanOptionalAction, default=None,
                   help="heavy-hitter: never evict the image's kept visual slots (default: the bundle's, pinned)")
    p.add_argument("--json", action="store_true", help="print one JSON object (per answer) instead of streaming text")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="where to run: auto (engines, else a CUDA GPU, else CPU; default), cpu, cuda, trt")
    p.add_argument("--skip-hash-check", action="store_true", help="do not verify the bundle files' sha256 (faster start)")
    p.add_argument("--version", action=VersionAction)
    return p


def main(argv: list[str] | None = None) -> int:
    """Returns the exit code: 0, or 2 for a user error (bad bundle, image, prompt or option)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the error
        return int(e.code or 0)
    try:
        turns = read_turns(args.turns) if args.turns is not None else None
        run(args.bundle, args.image, args.prompt, max_new_tokens=args.max_new_tokens, raw_prompt=args.raw_prompt,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed, as_json=args.json,
            verify_hashes=not args.skip_hash_check, ignore_eos=args.ignore_eos, exact_boundary=args.exact_boundary,
            turns=turns, interactive=args.interactive, backend=args.backend, cache_policy=args.cache_policy,
            cache_sinks=args.cache_sinks, cache_pin_image=args.cache_pin_image)
    except RuntimeStatusError as e:
        _report(f"error: {e.message}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _report("error: interrupted")
        return 130
    return 0


def _report(line: str) -> None:
    """The one error line on stderr (after what stdout still holds); silent when stderr itself is gone."""
    for stream, text in ((sys.stdout, ""), (sys.stderr, line + "\n")):
        try:
            _write(stream, text)
        except RuntimeStatusError:
            pass
