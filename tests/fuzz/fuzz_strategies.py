"""hypothesis strategies for hostile-but-fair inputs: JSON mutations, paths that try to leave a bundle,
numbers at and beyond every bound, images of every mode and size, and arbitrary API arguments."""

from __future__ import annotations

import copy
import json

import numpy as np
from hypothesis import strategies as st
from PIL import Image

# Paths a manifest might name to escape its bundle (DECOY is replaced by the decoy directory's absolute path).
ESCAPES = ["DECOY/tokenizer.json", "../outside-decoy/tokenizer.json", "../../outside-decoy/lm/prefill.onnx",
           "lm/../../outside-decoy/lm/lm.weights", "/etc/passwd", "/proc/self/environ", "", ".", "..", "lm/",
           "lm//decode.onnx", "./tokenizer.json", "lm\\decode.onnx", "tokenizer.json\0", "~/x", "lm/decode.onnx/",
           "vision/vision.onnx", "lm/lm.weights", "lm/lm.weights.json", "tokenizer.json", "manifest.json"]
BIG_INTS = [0, 1, -1, 2, 3, 7, 255, 256, 4096, 65535, 10 ** 6, 10 ** 9, 2 ** 31 - 1, 2 ** 31, 2 ** 32, 2 ** 53 + 1,
            2 ** 63 - 1, 2 ** 63, 10 ** 18, 2 ** 64, 10 ** 30, -(2 ** 63)]


def _deep(depth: int):
    node: list = []
    for _ in range(depth):
        node = [node]
    return node


def json_values(max_leaves: int = 6):
    """Any JSON value, biased to the ones that break parsers: huge and negative ints, non-finite floats,
    escaping paths, empty and deep containers."""
    leaves = st.one_of(
        st.sampled_from(BIG_INTS), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(), st.none(), st.sampled_from(ESCAPES), st.text(max_size=12),
        st.just(_deep(70)), st.just(_deep(5)),
    )
    return st.recursive(leaves, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                        max_leaves=max_leaves)


def _paths(node, prefix=()):
    """Every (path, value) in a JSON tree, the root excluded; a path is a tuple of keys/indices."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield prefix + (key,), value
        yield from _paths(value, prefix + (key,))


def _parent(tree, path):
    node = tree
    for key in path[:-1]:
        node = node[key]
    return node


# Groups of sizes that must change together to stay consistent (so a mutation reaches the graph and budget checks).
CONSISTENT = [
    [("shapes", "newline_slots"), ("shapes", "visual_slots"), ("shapes", "prefill_slots"), ("shapes", "cache_capacity")],
    [("shapes", "cache_capacity")],
    [("shapes", "partitions"), ("preprocess", "partitions")],
    [("shapes", "text_slots_after_image"), ("shapes", "prefill_slots"), ("shapes", "cache_capacity")],
    [("preprocess", "shortest_edge")],
    [("shapes", "vocab_size")],
    [("shapes", "hidden_size")],
]


@st.composite
def json_mutation(draw, base: dict, decoy: str, max_ops: int = 3):
    """(mutated deep copy of `base`, list of the operations applied)."""
    tree = copy.deepcopy(base)
    ops = []
    for _ in range(draw(st.integers(1, max_ops))):
        kind = draw(st.sampled_from(["replace", "replace", "delete", "scale", "insert", "consistent", "escape"]))
        paths = [p for p, _ in _paths(tree)]
        if kind == "consistent" and isinstance(tree.get("shapes"), dict):
            group = draw(st.sampled_from(CONSISTENT))
            delta = draw(st.sampled_from([1, 7, 1000, 10 ** 5, 10 ** 6, 2 ** 24, -1]))
            for path in group:
                parent = _parent(tree, path) if path[0] in tree else None
                if isinstance(parent, dict) and isinstance(parent.get(path[-1]), int):
                    parent[path[-1]] += delta
            ops.append(("consistent", [".".join(p) for p in group], delta))
            continue
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = _parent(tree, path)
        key = path[-1]
        if kind == "delete":
            del parent[key]
        elif kind == "scale" and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
            parent[key] = parent[key] * draw(st.sampled_from([0, -1, 2, 10, 1000, 10 ** 6])) + draw(st.sampled_from([0, 1, -1]))
        elif kind == "insert" and isinstance(parent[key], dict):
            parent[key][draw(st.sampled_from(["file", "weights", "x_file", "extra", "lm_weights", "step"]))] = draw(json_values())
        elif kind == "escape":
            parent[key] = draw(st.sampled_from(ESCAPES)).replace("DECOY", decoy)
        else:
            parent[key] = draw(json_values())
        ops.append((kind, [str(k) for k in path]))
    return tree, ops


def dumps(tree) -> str:
    """JSON as a hostile writer might produce it: NaN/Infinity literals are kept (the reader must refuse them)."""
    return json.dumps(tree, allow_nan=True)


@st.composite
def byte_mutation(draw, data: bytes):
    """`data` truncated, with bytes flipped, a slice duplicated, or garbage appended."""
    kind = draw(st.sampled_from(["truncate", "flip", "duplicate", "append"]))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data)))], kind
    if kind == "flip":
        out = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] = draw(st.integers(0, 255))
        return bytes(out), kind
    if kind == "duplicate":
        i = draw(st.integers(0, len(data)))
        j = draw(st.integers(i, min(len(data), i + 4096)))
        return data[:j] + data[i:j] + data[j:], kind
    return data + draw(st.binary(max_size=64)), kind


# --- images -------------------------------------------------------------------------------------------------

_MODE_DTYPES = {"I;16": np.uint16, "I;16L": np.uint16, "I;16B": ">u2", "I;16N": np.uint16, "I": np.int32, "F": np.float32}


@st.composite
def pil_images(draw):
    """A PIL image of any mode Pillow knows, any small size, with random content (NaN and inf for "F")."""
    mode = draw(st.sampled_from(Image.MODES))
    w, h = draw(st.integers(1, 90)), draw(st.integers(1, 90))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    if mode in _MODE_DTYPES:
        dtype = np.dtype(_MODE_DTYPES[mode])
        if dtype.kind == "f":
            a = (rng.standard_normal((h, w)) * draw(st.sampled_from([1.0, 255.0, 1e6, 1e30]))).astype(np.float32)
            if draw(st.booleans()):
                a.flat[rng.integers(0, a.size, 3)] = [np.nan, np.inf, -np.inf]
        else:
            info = np.iinfo(dtype)
            a = rng.integers(max(info.min, -(2 ** 31)), min(info.max, 2 ** 31 - 1), (h, w), endpoint=True).astype(dtype)
        image = Image.frombuffer(mode, (w, h), a.tobytes(), "raw", mode, 0, 1)
    else:
        bands = len(Image.new(mode, (1, 1)).getbands())
        raw = rng.integers(0, 256, h * w * bands, dtype=np.uint8).tobytes()
        image = Image.new(mode, (w, h))
        try:
            image.frombytes(raw[: len(image.tobytes())])
        except ValueError:
            pass  # modes whose raw layout differs keep their blank content
    if mode in ("P", "L", "RGB") and draw(st.booleans()):
        image.info["transparency"] = 0 if mode != "RGB" else (0, 0, 0)
    return image


IMAGE_FORMATS = ["PNG", "TIFF", "BMP", "GIF", "WEBP", "JPEG", "PPM", "ICO", "TGA"]


# --- API arguments ------------------------------------------------------------------------------------------


def api_values(handles: list):
    """Anything a caller might pass: live handles of every kind, numbers at the edges, strings with NUL and
    surrogates, containers, arrays, objects."""
    return st.one_of(
        st.sampled_from(handles), st.sampled_from(BIG_INTS), st.integers(), st.floats(allow_nan=True),
        st.booleans(), st.none(), st.text(max_size=20), st.binary(max_size=10),
        st.sampled_from(["\udcc3", "a\0b", "", "<image>", "<image><image>", "/etc/passwd"]),
        st.lists(st.integers(-(2 ** 40), 2 ** 40), max_size=5), st.just(np.arange(3)), st.just(np.zeros((2, 2))),
        st.just(np.float32(np.nan)), st.just(object()), st.just({"a": 1}), st.just(Image.new("La", (5, 5))),
    )
