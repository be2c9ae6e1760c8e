"""The fuzz suite's harness: a master bundle to mutate, decoys outside it, and the three observers every
property uses: the status (never INTERNAL_ERROR, never an exception, a one-line message), the memory the
runtime allocates (tracemalloc peak against the budget it was given) and the files it reads (an audit hook
for Python-level opens and listings, access times of decoy files for reads from C++/Rust code).

Every property runs a bounded number of examples in CI (derandomized, so CI is reproducible) and 25 times
more, randomly, with the opt-in marker: `pytest -m fuzz_deep tests/fuzz`. With EDGEPRUNE_FUZZ_REPORT=FILE
the worst example (largest traced peak) of the session is written there as JSON (tests/fuzz/worst_case.py
measures a fresh process on it).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, event, settings
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "runtime"))  # fake_bundle.py

from fake_bundle import make_fake_bundle  # noqa: E402

from edgeprune_runtime import Status, capi  # noqa: E402

BUDGET_MB = 64  # the memory budget every fuzzed bundle is loaded under
SLACK = 24 << 20  # Python objects the budget does not count (tokenizer, ORT bindings, hypothesis itself)
RSS_SLACK = 96 << 20  # the same plus ONNX Runtime's sessions and arenas and PIL's decoders (native memory)
DEEP_FACTOR = 25
DECOY = "outside-decoy"  # the directory name of the decoys: a manifest that loads never mentions it


def fuzz_settings(ci_examples: int, deep: bool = False):
    """hypothesis settings: `ci_examples` derandomized examples, or DEEP_FACTOR times more, random, for -m fuzz_deep."""
    common = dict(deadline=None, print_blob=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                         HealthCheck.data_too_large, HealthCheck.filter_too_much])
    if deep:
        return settings(max_examples=ci_examples * DEEP_FACTOR, **common)
    return settings(max_examples=ci_examples, derandomize=True, database=None, **common)


# --- what the runtime reads -------------------------------------------------------------------------------


class ReadLog:
    """Paths the runtime opened or listed from Python while `active` (one audit hook for the session)."""

    def __init__(self):
        self.active = False
        self.paths: list[str] = []

    def __call__(self, event: str, args) -> None:
        if self.active and event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes, os.PathLike)):
            self.paths.append(os.fsdecode(args[0]))


READS = ReadLog()
sys.addaudithook(READS)


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class RssPeak:
    """Peak resident memory of this process since `start` (Linux: VmHWM, reset through /proc/self/clear_refs),
    the observer of native allocations (ONNX Runtime, PIL) that tracemalloc does not see."""

    def __init__(self):
        try:
            self.start()
            self.works = True
        except OSError:
            self.works = False

    def start(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.base = _status_kb("VmRSS") << 10

    def growth(self) -> int:
        return (_status_kb("VmHWM") << 10) - self.base if self.works else 0


RSS = RssPeak()


def _atime_works(directory: Path) -> bool:
    probe = directory / "atime-probe"
    probe.write_bytes(b"x")
    os.utime(probe, (0, 0))
    probe.read_bytes()
    return os.stat(probe).st_atime > 0


@dataclass
class Decoys:
    """Valid copies of the bundle's files outside it: what a path that escapes the bundle would reach."""

    root: Path
    atime_works: bool
    files: list[Path] = field(default_factory=list)

    def arm(self) -> None:
        for f in self.files:
            os.utime(f, (0, 0))

    def touched(self) -> list[str]:
        """Decoys read since `arm` (atime moved), when the file system keeps access times."""
        return [str(f) for f in self.files if self.atime_works and os.stat(f).st_atime > 0]


@dataclass
class Master:
    bundle: Path  # the fake bundle, never modified
    long_cache: Path  # a fake bundle whose 60000-slot KV cache alone is ~11 MiB (budget-sized cases)
    decoys: Decoys
    image: Path
    work: Path  # per-example copies go here


def make_master(base: Path) -> Master:
    """Builds the master bundles, decoys and test image under `base` (once per session)."""
    bundle, _ = make_fake_bundle(base / "bundle")
    long_cache, _ = make_fake_bundle(base / "long" / "bundle", new_slots=60_000)
    decoy_root = base / DECOY
    shutil.copytree(bundle, decoy_root)
    decoys = Decoys(decoy_root, _atime_works(base), [p for p in decoy_root.rglob("*") if p.is_file()])
    image = base / "cam.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 70, 3), dtype=np.uint8)).save(image)
    work = base / "work"
    work.mkdir()
    return Master(bundle, long_cache, decoys, image, work)


def fresh_copy(master: Master, source: Path | None = None) -> Path:
    """A private copy of the master bundle (or `source`) to mutate; the previous copy is removed."""
    dst = master.work / "bundle"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(source or master.bundle, dst, symlinks=True)
    return dst


# --- running one example and checking the properties ----------------------------------------------------


@dataclass
class Outcome:
    load: Status
    request: Status | None  # None when the bundle did not load
    message: str
    peak: int  # traced bytes, the peak while loading and serving one request
    rss: int  # growth of the resident set's peak over the same time


WORST: dict = {}


def one_line(message: str) -> None:
    assert message and "\n" not in message and "Traceback" not in message, repr(message)


def check_status(status, allowed=None) -> Status:
    """A Status (never an exception, never INTERNAL_ERROR), one line of GetLastError when not OK."""
    assert isinstance(status, Status), status
    assert status != Status.INTERNAL_ERROR, capi.GetLastError()
    if status != Status.OK:
        one_line(capi.GetLastError())
        if allowed is not None:
            assert status in allowed, (status, capi.GetLastError())
    return status


def load_and_serve(master: Master, root: Path, budget_mb: int = BUDGET_MB, note: dict | None = None) -> Outcome:
    """Bundle_Create under `budget_mb`, then (if it loaded) one request of two tokens, a decode and a follow-up; checks that
    the statuses are statuses, the traced peak stays within the budget and nothing outside the bundle is read."""
    master.decoys.arm()
    READS.paths.clear()
    READS.active = True
    if RSS.works:
        RSS.start()
    tracemalloc.start()
    tracemalloc.reset_peak()
    request = None
    try:
        out = capi.Out()
        load = check_status(capi.Bundle_Create(str(root), out, memory_budget_mb=budget_mb),
                            {Status.BUNDLE_INVALID, Status.RESOURCE_LIMIT})
        message = capi.GetLastError() if load != Status.OK else ""
        if load == Status.OK:
            bundle = out.value
            params, gen, text = capi.Out(), capi.Out(), capi.Out()
            capi.GeneratorParams_Create(params)
            capi.GeneratorParams_SetMaxNewTokens(params.value, 2)
            request = check_status(capi.Generator_Create(bundle, params.value, str(master.image), "What is this?", False, gen))
            if request == Status.OK:
                while check_status(capi.Generator_IsDone(gen.value, text)) == Status.OK and not text.value:
                    if check_status(capi.Generator_GenerateNextToken(gen.value)) != Status.OK:
                        break
                check_status(capi.Generator_GetTokenIds(gen.value, text))
                check_status(capi.Bundle_DecodeTokens(bundle, text.value, text))
                follow = capi.Out()  # a follow-up opens the step graph a manifest may name (graphs.step)
                if check_status(capi.Generator_CreateFollowUp(gen.value, params.value, "And?", False, follow)) == Status.OK:
                    capi.Generator_Destroy(follow.value)
                capi.Generator_Destroy(gen.value)
            capi.GeneratorParams_Destroy(params.value)
            capi.Bundle_Destroy(bundle)
        peak = tracemalloc.get_traced_memory()[1]
        rss = RSS.growth()
    finally:
        tracemalloc.stop()
        READS.active = False
    escaped = [p for p in READS.paths if DECOY in p]
    assert not escaped, f"the runtime read outside the bundle: {escaped[:3]}"
    assert not master.decoys.touched(), f"a decoy outside the bundle was read: {master.decoys.touched()[:3]}"
    assert peak <= budget_mb * (1 << 20) + SLACK, f"traced peak {peak} bytes over the {budget_mb} MiB budget"
    assert rss <= budget_mb * (1 << 20) + RSS_SLACK, f"resident memory grew {rss} bytes, over the {budget_mb} MiB budget"
    if load == Status.OK:  # then no section that names files may point at the decoys
        loaded = json.loads((root / "manifest.json").read_text())
        named = json.dumps([loaded.get(k) for k in ("graphs", "tokenizer", "engines")] + list(loaded.get("files", {})))
        assert DECOY not in named, "a manifest naming a file outside the bundle loaded"
    event(f"load {load.name}" + (f", request {request.name}" if request is not None else ""))
    if peak > WORST.get("peak_bytes", -1):
        WORST.update(peak_bytes=peak, rss_growth_bytes=rss, budget_bytes=budget_mb << 20, load=load.name,
                     request=request.name if request is not None else None, message=message, note=note or {})
        report = os.environ.get("EDGEPRUNE_FUZZ_REPORT")
        if report:  # keep the bundle itself: tests/fuzz/worst_case.py measures a fresh process on it
            copy = Path(report).with_suffix(".bundle")
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(root, copy, symlinks=True)
            WORST["bundle"] = str(copy)
    return Outcome(load, request, message, peak, rss)

