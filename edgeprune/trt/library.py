"""The TensorRT library of a target, imported lazily, and the parts of its API that moved between versions.

One code path serves classic TensorRT 8.5 to 11 (`import tensorrt`) and TensorRT for RTX
(`import tensorrt_rtx_bindings`): the calls used are those all of them share
(`build_serialized_network`, `set_memory_pool_limit`, `OnnxParser.parse_from_file`, optimization
profiles); what differs is probed, never assumed from a version number alone:

- EXPLICIT_BATCH must be set below TensorRT 10 and does not exist from 10 on;
- STRONGLY_TYPED exists from 10 on (always on in 11 and in TensorRT-RTX);
- BuilderFlag.FP16 / INT8 exist up to 10 and are gone in 11 and TensorRT-RTX;
- TensorRT-RTX builds ahead of time for listed compute capabilities (`set_compute_capability`),
  without a GPU.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from edgeprune.errors import MissingDependencyError
from edgeprune.trt.targets import Target

MODULES = {"tensorrt": "tensorrt", "tensorrt_rtx": "tensorrt_rtx_bindings"}


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def import_library(target: Target):
    """The target's TensorRT module; MissingDependencyError naming the install command when absent,
    or when the installed version is not one the target runs."""
    name = MODULES[target.library]
    try:
        trt = importlib.import_module(name)
    except ImportError:
        raise MissingDependencyError(f"target {target.name} needs the `{name}` module: {target.install_hint}") from None
    have = _major_minor(trt.__version__)
    if have not in target.trt_versions:
        raise MissingDependencyError(f"target {target.name} needs TensorRT {' or '.join(target.trt_versions)}, but "
                                     f"`{name}` is {trt.__version__}: {target.install_hint}")
    return trt


def parser_library():
    """(module, label) of any importable TensorRT ONNX parser, preferring classic TensorRT; None if none."""
    for library, name in MODULES.items():
        try:
            trt = importlib.import_module(name)
        except ImportError:
            continue
        return trt, f"{'TensorRT' if library == 'tensorrt' else 'TensorRT-RTX'} {trt.__version__}"
    return None


@dataclass
class ParseResult:
    ok: bool
    errors: list[tuple[str, str, str]]  # (node name, op type, message)
    network: object
    builder: object
    logger: object
    parser: object  # owns weights the network refers to: keep it alive until the build is done


def make_logger(trt):
    """A TensorRT logger that keeps error messages (the builder reports failures only through it)."""

    class Collecting(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors.append(str(msg))

    return Collecting()


def parse_onnx(trt, path, strongly_typed: bool) -> ParseResult:
    """Parses the ONNX file at `path` (external data beside it) into a new network of `trt`."""
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    flags = 0
    creation = trt.NetworkDefinitionCreationFlag
    if hasattr(creation, "EXPLICIT_BATCH") and int(trt.__version__.split(".")[0]) < 10:
        flags |= 1 << int(creation.EXPLICIT_BATCH)
    if strongly_typed and hasattr(creation, "STRONGLY_TYPED"):
        flags |= 1 << int(creation.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    ok = bool(parser.parse_from_file(str(path)))
    errors = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node_name = e.node_name() if hasattr(e, "node_name") else str(e.node())
        op = e.node_operator() if hasattr(e, "node_operator") else ""
        desc = next((ln for ln in str(e.desc()).splitlines() if ln.strip()), str(e.code()))
        errors.append((node_name, op, desc))
    return ParseResult(ok, errors, network, builder, logger, parser)
