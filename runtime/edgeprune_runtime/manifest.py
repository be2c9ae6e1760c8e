"""The bundle manifest: the only contract between the toolchain (writer) and the runtime (reader).

Bundle layout (paths relative to the bundle directory):

    manifest.json            this schema; every other file is listed with its sha256
    tokenizer.json           `tokenizers` file of the source model
    vision/vision.onnx       pixels -> K selected visual embeddings (+ newline slots)
    vision/vision.weights    its external weights (+ vision.weights.json: name/offset/length/dtype/shape)
    lm/prefill.onnx          text + visual slots -> last logits + K/V of every slot
    lm/decode.onnx           one token + fixed-size cache -> logits + the new K/V slice
    lm/lm.weights            language-model weights, stored ONCE and referenced by both graphs
    lm/lm.weights.json       the index of lm.weights, so a runtime can share them without parsing ONNX

Graph interfaces (all shapes static; P partitions, N patches each, V visual slots, T1/T2 text
slots before/after the image, S = T1 + V + T2 prefill slots, C cache slots, D LM width):

    vision   in:  pixel_values f32[P,3,H,W], patch_valid f32[P,N], patch_key f32[P,N], and the layout
                  inputs the selection strategy reads (a subset of `layout.Layout.feeds()`):
                  patch_row f32[P,N], newline_key f32[R], newline_valid f32[R], base_region f32[N],
                  partition_real f32[P], released_valid f32[P,N], released_key f32[P,N]
             out: visual_embeds f32[V,D], visual_valid f32[V], visual_source i64[V]
    prefill  in:  text_ids i64[T1+T2], text_valid f32[T1+T2], visual_embeds f32[V,D], visual_valid f32[V]
             out: logits f32[vocab], key_<l> / value_<l> f32[Hkv_l,S,Dh] per layer l
    decode   in:  token_id i64[1], position i64[1], cache_valid f32[C],
                  past_key_<l> / past_value_<l> f32[Hkv_l,C,Dh]
             out: logits f32[vocab], new_key_<l> / new_value_<l> f32[Hkv_l,1,Dh]

Validity inputs are 0/1 floats; each graph turns them into additive masks itself.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeprune_runtime.errors import bundle_invalid

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"


@dataclass(frozen=True)
class Shapes:
    """Every static size of a bundle; graphs, cache buffers and checks derive from this one object."""

    partitions: int  # P: base image + max crops
    crop_size: int  # H == W of every partition, pixels
    patch_grid: int  # g: patches per side of a partition
    patches_per_partition: int  # N = g * g
    visual_topk: int  # K: patch tokens selected
    newline_slots: int  # R: image_newline candidates (max stitched rows); 0 when dropped
    visual_slots: int  # V = K + R
    text_slots_before_image: int  # T1
    text_slots_after_image: int  # T2
    prefill_slots: int  # S = T1 + V + T2
    cache_capacity: int  # C
    hidden_size: int  # D of the language model
    vocab_size: int
    num_layers: int
    kv_heads: tuple[int, ...]  # per LM layer (head pruning may shrink them)
    head_dim: int

    @classmethod
    def from_dict(cls, d: dict) -> "Shapes":
        d = dict(d)
        d["kv_heads"] = tuple(d["kv_heads"])
        return cls(**d)


@dataclass(frozen=True)
class WeightEntry:
    """One tensor of a weights file, as listed in its `<file>.json` index ({"file", "tensors": [...]})."""

    name: str  # the initializer name, the same in every graph that uses the tensor
    offset: int  # bytes into the weights file
    length: int  # bytes
    dtype: str  # numpy dtype string, e.g. "<f4"
    shape: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"name": self.name, "offset": self.offset, "length": self.length, "dtype": self.dtype,
                "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: dict) -> "WeightEntry":
        return cls(d["name"], int(d["offset"]), int(d["length"]), str(d["dtype"]), tuple(int(x) for x in d["shape"]))


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict[str, Any]
    shapes: Shapes

    def path(self, rel: str) -> Path:
        return self.root / rel

    @property
    def preprocess(self) -> dict:
        return self.data["preprocess"]

    @property
    def tokenizer(self) -> dict:
        return self.data["tokenizer"]

    @property
    def graphs(self) -> dict:
        return self.data["graphs"]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(bundle_dir: str | Path, verify_hashes: bool = True) -> Manifest:
    """Reads and checks `bundle_dir/manifest.json`.

    Raises RuntimeStatusError(BUNDLE_INVALID) naming the problem: missing directory or manifest,
    malformed JSON, unknown schema version, missing keys, a listed file missing or with a
    sha256 different from the manifest's (`verify_hashes=False` skips only the hashing).
    """
    root = Path(bundle_dir)
    if not root.is_dir():
        raise bundle_invalid(f"bundle directory {root} does not exist; create one with `edgeprune export`")
    mpath = root / MANIFEST_NAME
    if not mpath.is_file():
        raise bundle_invalid(f"{root} has no {MANIFEST_NAME}; it is not an edgeprune bundle (re-run `edgeprune export`)")
    try:
        data = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bundle_invalid(f"{mpath} is malformed JSON ({e}); re-run `edgeprune export`") from None
    if not isinstance(data, dict):
        raise bundle_invalid(f"{mpath} is not a JSON object; re-run `edgeprune export`")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise bundle_invalid(
            f"bundle schema version {version!r} is not supported by this runtime (expects {SCHEMA_VERSION}); "
            "re-export the bundle with a matching edgeprune version"
        )
    for key in ("source", "recipe", "shapes", "preprocess", "tokenizer", "graphs", "files", "prompt_template"):
        if key not in data:
            raise bundle_invalid(f"{mpath} lacks the key {key!r}; re-run `edgeprune export`")
    try:
        shapes = Shapes.from_dict(data["shapes"])
    except (TypeError, KeyError, ValueError) as e:  # unknown/missing field, kv_heads missing or not a list
        raise bundle_invalid(f"{mpath} has malformed shapes ({type(e).__name__}: {e}); re-run `edgeprune export`") from None
    for rel, digest in data["files"].items():
        fpath = root / rel
        if not fpath.is_file():
            raise bundle_invalid(f"bundle file {rel} is missing from {root}; re-run `edgeprune export`")
        if verify_hashes and sha256_file(fpath) != digest:
            raise bundle_invalid(f"bundle file {rel} does not match its sha256 in the manifest (modified or corrupt); re-export")
    return Manifest(root, data, shapes)
