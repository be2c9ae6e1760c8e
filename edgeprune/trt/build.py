"""`edgeprune build`: TensorRT engines for a bundle and a target, written into `engines/<target>/`.

Two engines per bundle:

    vision.engine   from vision/vision.onnx (static shapes, one profile)
    lm.engine       from lm/step.onnx, ONE engine with two optimization profiles over the same
                    weights: "prefill" (T = S slots) and "decode" (T in [1, 2])

Prefill and decode as separate engines would each embed the whole language model (measured on
llava-next-7b-shape --layers 2 with TensorRT-RTX: the decode engine alone is 2.67 GB, the LM's
weights), and a Jetson cannot hold two copies of a 7B model. The decode profile spans [1, 2]
rather than exactly 1: a profile fixed at one row gets a GEMV weight layout of its own and the
weights are stored twice (measured with TensorRT-RTX 1.7; see README "Targets").

Beside each engine, `<name>.ctx.onnx` is its EPContext wrapper model (trt/epcontext.py): what the runtime's
`--backend trt` opens with ONNX Runtime's TensorRT (or TensorRT-RTX) provider.

The engines are built in a scratch directory inside the bundle, then renamed into place and the
manifest replaced, so a failure leaves the bundle as it was.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgeprune.errors import BuildError
from edgeprune.trt.epcontext import CONTEXT_SUFFIX, write_context_model
from edgeprune.trt.library import import_library, parse_onnx
from edgeprune.trt.targets import Target

WORKSPACE_FRACTION = 0.5  # of the device's memory, for the builder's tactic workspace
DECODE_SLOTS = (1, 1, 2)  # min, opt, max T of the decode profile
# ComputeCapability enum member of TensorRT-RTX per "major.minor"
RTX_CC = {"7.5": "SM75", "8.0": "SM80", "8.6": "SM86", "8.9": "SM89", "12.0": "SM120", "12.1": "SM121"}


@dataclass
class EngineSpec:
    name: str  # "vision" | "lm"
    graph: str  # bundle-relative ONNX file
    profiles: list[dict] = field(default_factory=list)  # [{"name", "shapes": {input: [min, opt, max]}}]


@dataclass
class BuiltEngine:
    spec: EngineSpec
    file: str  # bundle-relative
    bytes: int
    seconds: float


def engine_specs(manifest) -> list[EngineSpec]:
    """What to build for a bundle: the vision graph as is, the step graph with two profiles."""
    graphs, s = manifest.graphs, manifest.shapes
    if "step" not in graphs:
        raise BuildError(f"{manifest.root} has no step graph (exported before edgeprune could build engines); "
                         "re-export it with `edgeprune export`")
    lo, hi = graphs["step"].get("dynamic", {}).get("T", [1, s.prefill_slots])
    if not (lo <= DECODE_SLOTS[0] and DECODE_SLOTS[2] <= s.prefill_slots <= hi):
        raise BuildError(f"the step graph's T range [{lo}, {hi}] does not cover decode and prefill; re-export")
    per_slot = lambda t: {"token_ids": [t], "visual_embeds": [t, s.hidden_size], "is_visual": [t], "slot_valid": [t]}  # noqa: E731
    prefill = {n: [shape] * 3 for n, shape in per_slot(s.prefill_slots).items()}
    decode = {n: [per_slot(t)[n] for t in DECODE_SLOTS] for n in per_slot(1)}
    return [EngineSpec("vision", graphs["vision"]["file"]),
            EngineSpec("lm", graphs["step"]["file"], [{"name": "prefill", "shapes": prefill},
                                                      {"name": "decode", "shapes": decode}])]


def _builder_config(trt, builder, target: Target, precision: str):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(target.device_memory_gib * WORKSPACE_FRACTION * 2**30))
    flags = trt.BuilderFlag
    if precision == "fp16" and not target.strongly_typed and hasattr(flags, "FP16"):
        config.set_flag(flags.FP16)  # weakly typed TensorRT may also run other layers in fp16
    if target.library == "tensorrt_rtx":
        # Ahead-of-time build for the target's GPUs; works without a GPU (no timing cache, which would query one).
        config.num_compute_capabilities = len(target.compute_capabilities)
        for i, cc in enumerate(target.compute_capabilities):
            config.set_compute_capability(getattr(trt.ComputeCapability, RTX_CC[cc]), i)
    return config


def _progress_monitor(trt, on_progress: Callable[[str], None]):
    if not hasattr(trt, "IProgressMonitor"):  # TensorRT < 10
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            on_progress(phase_name)

        def step_complete(self, phase_name, step):
            return True  # keep building

        def phase_finish(self, phase_name):
            pass

    return Monitor()


def build_engine(trt, spec: EngineSpec, bundle: Path, dest: Path, target: Target, precision: str,
                 on_progress: Callable[[str], None] = lambda s: None) -> int:
    """Parses `bundle/spec.graph`, builds it and writes the serialized engine to `dest`; returns its size.

    BuildError naming the node or the builder's first error on failure."""
    parsed = parse_onnx(trt, bundle / spec.graph, target.strongly_typed)
    if not parsed.ok:
        node, op, msg = parsed.errors[0] if parsed.errors else ("?", "?", "no detail")
        raise BuildError(f"TensorRT cannot parse {spec.graph}: node {node} ({op}): {msg}; "
                         f"run `edgeprune check {bundle} --target {target.name}` for every finding")
    config = _builder_config(trt, parsed.builder, target, precision)
    for p in spec.profiles:
        profile = parsed.builder.create_optimization_profile()
        for name, (lo, opt, hi) in p["shapes"].items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    monitor = _progress_monitor(trt, on_progress)
    if monitor is not None:
        config.progress_monitor = monitor
    serialized = parsed.builder.build_serialized_network(parsed.network, config)
    if serialized is None:
        first = parsed.logger.errors[0].splitlines()[0] if parsed.logger.errors else "no message"
        raise BuildError(f"TensorRT could not build {spec.graph} for {target.name}: {first}")
    with open(dest, "wb") as f:  # straight from TensorRT's buffer: a 7B engine is not copied in memory
        f.write(serialized)
    return serialized.nbytes


def build_bundle(bundle_dir: str | Path, target: Target, on_stage: Callable[[str], None] = lambda s: None) -> dict:
    """Builds every engine of the bundle for `target` into `engines/<target>/` and records them in the manifest.

    Returns the manifest's new entry for the target. Raises MissingDependencyError (no TensorRT for the
    target), BuildError (parse or build failure), RuntimeStatusError (bad bundle); the bundle is unchanged
    then.
    """
    from edgeprune_runtime.manifest import MANIFEST_NAME, load_manifest, sha256_file

    from edgeprune.trt.check import precision_refusal

    trt = import_library(target)  # before touching anything: no TensorRT -> nothing written
    bundle = Path(bundle_dir)
    manifest = load_manifest(bundle)
    precision = manifest.data.get("onnx", {}).get("precision", "fp32")
    refusal = precision_refusal(target, precision)
    if refusal:
        raise BuildError(refusal)
    specs = engine_specs(manifest)

    rel_dir = f"engines/{target.name}"
    scratch = Path(tempfile.mkdtemp(prefix=f".engines-{target.name}.partial-", dir=bundle))
    scratch.chmod(0o755)  # mkdtemp makes it private; engines are shared like the rest of the bundle
    try:
        built = []
        for spec in specs:
            on_stage(f"build {spec.name} engine from {spec.graph}")
            start = time.perf_counter()
            size = build_engine(trt, spec, bundle, scratch / f"{spec.name}.engine", target, precision,
                                on_progress=lambda p, n=spec.name: on_stage(f"{n}: {p}"))
            write_context_model(bundle / spec.graph, scratch / f"{spec.name}.engine", target.library,
                                scratch / f"{spec.name}{CONTEXT_SUFFIX}")
            built.append(BuiltEngine(spec, f"{rel_dir}/{spec.name}.engine", size, time.perf_counter() - start))
        on_stage("write manifest")
        entry = {
            "library": target.library, "version": trt.__version__, "compute_capabilities": list(target.compute_capabilities),
            "precision": precision, "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "engines": {b.spec.name: {"file": b.file, "sha256": sha256_file(scratch / Path(b.file).name), "bytes": b.bytes,
                                      "graph": b.spec.graph, "build_seconds": round(b.seconds, 3),
                                      "profiles": b.spec.profiles,
                                      "context_file": f"{rel_dir}/{b.spec.name}{CONTEXT_SUFFIX}"} for b in built},
        }
        data = json.loads((bundle / MANIFEST_NAME).read_text())
        data.setdefault("engines", {})[target.name] = entry
        data["files"] = {rel: digest for rel, digest in data["files"].items() if not rel.startswith(rel_dir + "/")}
        data["files"].update({e["file"]: e["sha256"] for e in entry["engines"].values()})
        data["files"].update({e["context_file"]: sha256_file(scratch / Path(e["context_file"]).name)
                              for e in entry["engines"].values()})
        tmp_manifest = scratch / MANIFEST_NAME
        tmp_manifest.write_text(json.dumps(data, indent=2))
        _install(scratch, bundle / rel_dir, tmp_manifest, bundle / MANIFEST_NAME)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return entry


def _install(scratch: Path, engines_dir: Path, new_manifest: Path, manifest: Path) -> None:
    """Moves the built engines to `engines_dir` and the new manifest over the old one; an older engines
    directory is moved aside first and restored if anything fails before the manifest is replaced."""
    made_parent = not engines_dir.parent.exists()
    engines_dir.parent.mkdir(exist_ok=True)
    staged_manifest = manifest.with_name(f".{manifest.name}.new-{os.getpid()}")
    old = engines_dir.with_name(f".{engines_dir.name}.old-{os.getpid()}") if engines_dir.exists() else None
    moved = False
    try:
        os.replace(new_manifest, staged_manifest)
        if old is not None:
            os.replace(engines_dir, old)
        os.replace(scratch, engines_dir)
        moved = True
        os.replace(staged_manifest, manifest)
    except BaseException:
        if moved:
            shutil.rmtree(engines_dir, ignore_errors=True)
        if old is not None and old.exists():
            os.replace(old, engines_dir)
        staged_manifest.unlink(missing_ok=True)
        if made_parent and not any(engines_dir.parent.iterdir()):
            engines_dir.parent.rmdir()
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
