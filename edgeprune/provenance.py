"""Where a measurement comes from: commit, machine and library versions, for every results JSON.

`provenance()` is torch-free and cheap (it reads package metadata, /proc and git), so the benchmark
reports, the sweep and the mutation run stamp their JSON with it; `write_json` writes a file
atomically (temp file, then rename), so an interrupted run never leaves half a result.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "transformers", "onnx", "onnxruntime", "numpy", "tokenizers", "pillow", "mutmut")


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) * 1024 / 2**30, 1)  # kB
    except OSError:
        pass
    return None


def provenance(argv: list[str] | None = None) -> dict:
    """{"commit", "dirty", "command", "date", "machine": {...}, "libraries": {name: version}}."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    status = _git("status", "--porcelain", "--untracked-files=no")
    argv = sys.argv if argv is None else argv
    return {
        "commit": _git("rev-parse", "HEAD"),
        "dirty": bool(status) if status is not None else None,  # tracked files differed from the commit
        "command": " ".join([Path(argv[0]).name, *argv[1:]]) if argv else None,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "memory_gib": memory_gib(),
            "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(),
        },
        "libraries": versions,
    }


def write_json(path: str | Path, data: dict) -> Path:
    """Writes `data` as indented JSON to `path` through a temp file in the same directory, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    return path
