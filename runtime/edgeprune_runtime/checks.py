"""Typed reading of untrusted bundle data: JSON files, numbers, strings and paths, each checked for type and
bound before use. Every failure is RuntimeStatusError(BUNDLE_INVALID) with one line naming the value.

A bundle is input from outside (README "Threat model"): nothing in it may make the runtime read a file outside
the bundle, follow a symlink, parse without bound or crash with a Python exception.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path
from typing import Any

from edgeprune_runtime.errors import bundle_invalid

MAX_JSON_DEPTH = 64  # manifest.json nests 4 levels today; deeper input is refused before it is walked
MAX_PATH_CHARS = 1024


def show(value: Any, limit: int = 60) -> str:
    """repr(value), cut to `limit` characters: a hostile value must not make a message huge."""
    text = " ".join(repr(value).split())  # one line, whatever the object's repr looks like
    return text if len(text) <= limit else text[: limit - 3] + "..."


def printable(name: str) -> str:
    """A file name for a message: as it is when printable, else its repr (a newline in a name must not
    split the one-line message)."""
    return name if name.isprintable() else show(name, 200)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, computed without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            break
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return deepest


def regular_file(path: Path, what: str) -> os.stat_result:
    """lstat of `path`, which must be a regular file (not a symlink, FIFO or device)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise bundle_invalid(f"{what} {path} is missing; re-export the bundle") from None
    except OSError as e:
        raise bundle_invalid(f"cannot read {what} {path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise bundle_invalid(f"{what} {path} is a symlink; a bundle holds regular files only (copy the file in)")
    if not stat.S_ISREG(st.st_mode):
        raise bundle_invalid(f"{what} {path} is not a regular file; re-export the bundle")
    return st


def load_json(path: Path, max_bytes: int, what: str) -> Any:
    """Parses `path` as strict JSON (no NaN/Infinity, at most `max_bytes`, nesting <= MAX_JSON_DEPTH)."""
    size = regular_file(path, what).st_size
    if size > max_bytes:
        raise bundle_invalid(f"{what} {path} has {size} bytes, more than the {max_bytes} this runtime reads; re-export")
    try:
        with open(path, "rb") as f:
            raw = f.read(size + 1)  # not max_bytes + 1: read() allocates the buffer it is asked for
    except OSError as e:
        raise bundle_invalid(f"cannot read {what} {path}: {e.strerror}") from None
    if len(raw) > size:
        raise bundle_invalid(f"{what} {path} grew while being read; a bundle must not change while it loads")
    try:
        data = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise bundle_invalid(f"{what} {path} is nested too deeply; re-export the bundle") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, over-long integers, NaN/Infinity
        raise bundle_invalid(f"{what} {path} is malformed JSON ({' '.join(str(e).split())[:120]}); re-export") from None
    if _depth(data) > MAX_JSON_DEPTH:
        raise bundle_invalid(f"{what} {path} nests deeper than {MAX_JSON_DEPTH} levels; re-export the bundle")
    return data


def need_dict(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise bundle_invalid(f"{where} must be a JSON object, got {show(value)}; re-export the bundle")
    return value


def need_list(value: Any, where: str, max_len: int, min_len: int = 0) -> list:
    if not isinstance(value, list) or not min_len <= len(value) <= max_len:
        raise bundle_invalid(f"{where} must be a list of {min_len} to {max_len} items, got {show(value)}; "
                             "re-export the bundle")
    return value


def need_int(value: Any, where: str, lo: int, hi: int) -> int:
    """An integer (JSON 448.0 or true is not one) in [lo, hi]."""
    if type(value) is not int or not lo <= value <= hi:
        raise bundle_invalid(f"{where} must be an integer in [{lo}, {hi}], got {show(value)}; re-export the bundle")
    return value


def need_number(value: Any, where: str) -> float:
    """A finite int or float (not a bool)."""
    if type(value) not in (int, float) or not math.isfinite(value):
        raise bundle_invalid(f"{where} must be a finite number, got {show(value)}; re-export the bundle")
    return float(value)


def need_str(value: Any, where: str, max_len: int, min_len: int = 1) -> str:
    if not isinstance(value, str) or not min_len <= len(value) <= max_len:
        raise bundle_invalid(f"{where} must be a string of {min_len} to {max_len} characters, got {show(value)}; "
                             "re-export the bundle")
    return value


def relative_path(value: Any, where: str) -> str:
    """A bundle-relative POSIX path of printable characters with no '..', '.', empty or absolute part (checked
    lexically)."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_PATH_CHARS or not value.isprintable() or "\\" in value:
        raise bundle_invalid(f"{where} must be a relative path inside the bundle, got {show(value)}")
    if value.startswith("/") or any(part in ("", ".", "..") for part in value.split("/")):
        raise bundle_invalid(f"{where} = {show(value)} must be a relative path inside the bundle "
                             "(no leading '/', no '..' or '.' parts); re-export the bundle")
    return value


def inside(root: Path, rel: str, where: str) -> Path:
    """root/rel, after checking that no part of it is a symlink and that it resolves inside root."""
    relative_path(rel, where)
    path = root
    for part in rel.split("/"):
        path = path / part
        if path.is_symlink():
            raise bundle_invalid(f"{where} = {show(rel)} passes through the symlink {path}; "
                                 "a bundle holds regular files only")
    real_root = os.path.realpath(root)
    if os.path.commonpath([real_root, os.path.realpath(path)]) != real_root:
        raise bundle_invalid(f"{where} = {show(rel)} resolves outside the bundle {root}")
    return path
