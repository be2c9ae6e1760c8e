"""Target devices as data: `edgeprune/recipes/targets/<name>.toml` loaded into frozen `Target`s.

Each file names the TensorRT library and versions the device runs, its compute capabilities and
memory, the highest ONNX opset its parser takes, the precisions it can build, and the parser gaps
known beyond the operator table (`onnx_tensorrt_ops.json`), with the source of each fact beside it.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from edgeprune.errors import ConfigError
from edgeprune.recipe import RECIPE_DIR, did_you_mean

TARGET_DIR = RECIPE_DIR / "targets"
OPS_TABLE = Path(__file__).resolve().parent / "onnx_tensorrt_ops.json"
LIBRARIES = ("tensorrt", "tensorrt_rtx")
PRECISIONS = ("fp32", "fp16", "int8")


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    library: str  # "tensorrt" (classic, 8.5..11) or "tensorrt_rtx"
    trt_versions: tuple[str, ...]  # major.minor versions the device runs
    parser_table: str  # key of onnx_tensorrt_ops.json: the operator matrix of its parser
    compute_capabilities: tuple[str, ...]  # "8.7", ...
    device_memory_gib: float
    max_opset: int
    precisions: tuple[str, ...]
    precision_notes: dict[str, str]  # precision -> why it is refused
    int64_native: bool  # False: TensorRT < 9 casts INT64 tensors down to INT32
    strongly_typed: bool  # True: types come from the ONNX; no FP16/INT8 builder flags
    max_topk: int
    parser_gaps: dict[str, str]  # op type -> why this target's parser refuses it (beyond the table)

    @property
    def install_hint(self) -> str:
        if self.library == "tensorrt_rtx":
            return "pip install 'edgeprune[trt-rtx]'"
        versions = "/".join(self.trt_versions[:3]) + ("/..." if len(self.trt_versions) > 3 else "")
        return (f"install TensorRT {versions} with its Python bindings (`import tensorrt`; on a Jetson it comes "
                "with JetPack, elsewhere from NVIDIA's TensorRT packages)")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _load(path: Path) -> Target:
    where = f"target file {path}"
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where} is not valid TOML: {e}") from None
    fields = {f.name: f for f in dataclasses.fields(Target) if f.name != "name"}
    unknown = set(data) - set(fields)
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(f"{where}: unknown key {key!r}.{did_you_mean(key, fields)}")
    missing = set(fields) - set(data)
    if missing:
        raise ConfigError(f"{where}: missing key {sorted(missing)[0]!r}")
    data = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    target = Target(name=path.stem, **data)
    if target.library not in LIBRARIES:
        raise ConfigError(f"{where}: library must be one of {', '.join(LIBRARIES)}, got {target.library!r}")
    if target.parser_table not in op_table():
        raise ConfigError(f"{where}: parser_table {target.parser_table!r} is not one of {', '.join(op_table())}")
    bad = set(target.precisions) - set(PRECISIONS)
    if bad:
        raise ConfigError(f"{where}: unknown precision {sorted(bad)[0]!r} (known: {', '.join(PRECISIONS)})")
    return target


@cache
def targets() -> dict[str, Target]:
    """Every target profile, by name (file stem), sorted."""
    return {p.stem: _load(p) for p in sorted(TARGET_DIR.glob("*.toml"))}


def get_target(name: str) -> Target:
    """The named target; ConfigError listing the known ones otherwise."""
    known = targets()
    if name not in known:
        raise ConfigError(f"unknown target {name!r}.{did_you_mean(name, known)} Known targets: {', '.join(known)}")
    return known[name]


@cache
def op_table() -> dict[str, dict]:
    """{parser version: {"source": ..., "ops": {op: {"supported", "types", "restrictions"}}}}."""
    return json.loads(OPS_TABLE.read_text())


def op_refusal(target: Target, op_type: str) -> str | None:
    """Why `target`'s ONNX parser refuses `op_type`, or None when its operator table supports it."""
    if op_type in target.parser_gaps:
        return target.parser_gaps[op_type]
    table = op_table()[target.parser_table]
    entry = table["ops"].get(op_type)
    if entry is None:
        return f"{op_type} is not in the operator table of TensorRT {target.parser_table}'s parser ({table['source']})"
    if not entry["supported"]:
        return f"TensorRT {target.parser_table}'s parser does not support {op_type} ({table['source']})"
    return None
