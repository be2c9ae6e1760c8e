"""Where a bundle's resident memory goes, stage by stage (the worker behind `peak_memory.py --stages`).

    .venv/bin/python scripts/memory_stages.py BUNDLE IMAGE PROMPT N     # one JSON object on stdout

Runs one request with edgeprune_runtime only (N tokens, EOS ignored) and reads /proc/self/status at each stage:
after the imports, after each ONNX Runtime session is created, after the bundle is loaded, after vision, after
prefill, and after the last decode step. Before each stage the peak (VmHWM) is reset (`5` > /proc/self/clear_refs,
Linux >= 4.0), so `peak` is that stage's own high-water mark, not the process's so far. RssFile is file-backed
pages (the memory-mapped weights), RssAnon is private memory (ORT's copies, activations, Python). Linux only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

_FIELDS = {"VmRSS": "rss", "VmHWM": "peak", "RssAnon": "anon", "RssFile": "file"}


def status() -> dict[str, int]:
    """This process's resident sizes in bytes: rss, peak (since the last reset), anon, file."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in _FIELDS:
            out[_FIELDS[key]] = int(value.split()[0]) * 1024  # kB
    return out


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def main(argv: list[str]) -> int:
    bundle, image, prompt, n = argv[0], argv[1], argv[2], int(argv[3])
    stages: list[dict] = []

    def mark(name: str) -> None:
        stages.append({"stage": name, **status()})
        reset_peak()

    reset_peak()
    from edgeprune_runtime import engine as engine_module
    from edgeprune_runtime.generator import Generator, GeneratorParams, LoadedBundle

    import onnxruntime  # noqa: F401  (the engine imports it lazily; counted with the imports)

    mark("imports")
    open_session = engine_module.open_session

    def open_and_mark(path, options, what, *args):
        session = open_session(path, options, what, *args)
        mark(f"session {what}")
        return session

    engine_module.open_session = open_and_mark  # diagnostic only: a mark after each session the Engine creates
    loaded = LoadedBundle(bundle, verify_hashes=False, backend="cpu")
    mark("bundle loaded")
    engine = loaded.engine
    for method, name in (("run_vision", "vision"), ("start", "prefill")):
        def marked(*args, _run=getattr(engine, method), _name=name, **kwargs):
            result = _run(*args, **kwargs)
            mark(_name)
            return result
        setattr(engine, method, marked)
    gen = Generator(loaded, GeneratorParams(max_new_tokens=n, ignore_eos=True), image, prompt)
    while not gen.done:
        gen.generate_next_token()
    mark(f"decode ({len(gen.token_ids)} tokens)")
    print(json.dumps({"stages": stages, "token_ids": list(gen.token_ids), "timings": gen.timings.to_dict()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
