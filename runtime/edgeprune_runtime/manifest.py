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
             out: logits f32[vocab], key_<l> / value_<l> f32[Hkv_l,S_l,Dh] per layer l,
                  slot_valid_<l> f32[S_l] for each layer on fewer slots than S (visual tokens dropped)
    decode   in:  token_id i64[1], position i64[1], cache_valid f32[C] (or cache_valid_<l> f32[C_l] per layer,
                  see `per_layer_validity`), past_key_<l> / past_value_<l> f32[Hkv_l,C_l,Dh]
             out: logits f32[vocab], new_key_<l> / new_value_<l> f32[Hkv_l,1,Dh]
    decode_skip<k>  (SkipDecode, graphs.decode_skip.<k>): decode's interface for layers l >= k only

In-LLM visual-token dropping leaves layer l V_l visual slots (`Shapes.layer_visual_slots`): S_l = S - V + V_l,
C_l = C - V + V_l; without it S_l = S and C_l = C. Validity inputs are 0/1 floats; each graph turns them into
additive masks itself.

Trust (README "Threat model"): `load_manifest` treats the bundle as untrusted input. Every value is
checked for type and bound; every path the manifest names is relative, stays inside the bundle and
passes through no symlink; the bundle holds regular files and directories only, and every regular
file except manifest.json is listed in `files` with its sha256 (engines included).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgeprune_runtime import checks
from edgeprune_runtime.errors import RuntimeStatusError, Status, bundle_invalid

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20  # today's manifests are ~3 KB
MAX_SIZE = 1 << 24  # bound of every static size; what they allocate together is checked by budget.py
MAX_LAYERS = 4096
MAX_BUNDLE_ENTRIES = 100_000  # files and directories walked when checking that every file is listed
_SHA256 = re.compile(r"[0-9a-f]{64}")
FILE_SECTIONS = ("graphs", "tokenizer", "engines")  # manifest sections whose file keys name bundle files


def is_file_key(key: str) -> bool:
    """Keys that name a bundle file (relative path), in any entry under FILE_SECTIONS, however deep."""
    return key in ("file", "weights") or key.endswith(("_file", "_weights", "_path"))


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
    # V_l per LM layer: in-LLM visual-token dropping (FastV / PyramidDrop / YOPO) leaves layer l V_l <= V visual
    # slots, non-increasing with l; () = V in every layer (bundles from before dropping existed have no key)
    layer_visual_slots: tuple[int, ...] = ()

    def visual_slots_at(self, layer: int) -> int:
        """V_l: the visual slots layer `layer` runs on."""
        return self.layer_visual_slots[layer] if self.layer_visual_slots else self.visual_slots

    def prefill_slots_at(self, layer: int) -> int:
        """S_l = T1 + V_l + T2: the prefill slots layer `layer` runs on (and outputs K/V for)."""
        return self.prefill_slots - self.visual_slots + self.visual_slots_at(layer)

    def cache_slots_at(self, layer: int) -> int:
        """C_l = C - (V - V_l): layer `layer`'s cache; every layer keeps C - S slots for new tokens."""
        return self.cache_capacity - self.visual_slots + self.visual_slots_at(layer)

    @property
    def drops_visual(self) -> bool:
        return any(v < self.visual_slots for v in self.layer_visual_slots)

    @classmethod
    def from_dict(cls, d: Any) -> "Shapes":
        """From the manifest's `shapes` (untrusted): exactly these keys, integers in bounds, sizes consistent.

        Raises RuntimeStatusError(BUNDLE_INVALID) naming the first bad value."""
        d = checks.need_dict(d, "manifest `shapes`")
        names = [f.name for f in fields(cls)]
        optional = ("layer_visual_slots",)
        unknown, missing = sorted(set(d) - set(names)), [n for n in names if n not in d and n not in optional]
        if unknown or missing:
            raise bundle_invalid(f"manifest `shapes` has unknown keys {unknown} / lacks {missing}; re-export the bundle")
        values = {}
        for name in names:
            if name in optional and name not in d:
                continue
            if name in ("kv_heads", "layer_visual_slots"):
                items = checks.need_list(d[name], f"manifest shapes.{name}", MAX_LAYERS, 1 if name == "kv_heads" else 0)
                low = 1 if name == "kv_heads" else 0
                values[name] = tuple(checks.need_int(h, f"manifest shapes.{name}[]", low, MAX_SIZE) for h in items)
            else:
                low = 0 if name in ("newline_slots", "text_slots_before_image", "text_slots_after_image") else 1
                values[name] = checks.need_int(d[name], f"manifest shapes.{name}", low, MAX_SIZE)
        shapes = cls(**values)
        shapes.check()
        return shapes

    def check(self) -> None:
        """The relations between the sizes (plan.py builds them so); BUNDLE_INVALID names a broken one."""
        s = self
        rules = [
            (s.patches_per_partition == s.patch_grid ** 2, "patches_per_partition == patch_grid**2"),
            (s.crop_size % s.patch_grid == 0, "crop_size is a multiple of patch_grid"),
            (s.visual_topk <= s.partitions * s.patches_per_partition, "visual_topk <= partitions * patches_per_partition"),
            (s.visual_slots == s.visual_topk + s.newline_slots, "visual_slots == visual_topk + newline_slots"),
            (s.prefill_slots == s.text_slots_before_image + s.visual_slots + s.text_slots_after_image,
             "prefill_slots == text_slots_before_image + visual_slots + text_slots_after_image"),
            (len(s.kv_heads) == s.num_layers, "len(kv_heads) == num_layers"),
            (s.num_layers <= MAX_LAYERS, f"num_layers <= {MAX_LAYERS}"),
            (len(s.layer_visual_slots) in (0, s.num_layers), "layer_visual_slots is empty or has one entry per layer"),
            (all(a >= b for a, b in zip((s.visual_slots, *s.layer_visual_slots), s.layer_visual_slots)),
             "layer_visual_slots[l] <= visual_slots, non-increasing with l"),
            (not s.layer_visual_slots or s.layer_visual_slots[0] == s.visual_slots,
             "layer_visual_slots[0] == visual_slots (visual tokens can only leave after a layer)"),
        ]
        for ok, rule in rules:
            if not ok:
                raise bundle_invalid(f"manifest shapes break the rule {rule}; re-export the bundle")


MAX_SKIP_STAGES = 64


@dataclass(frozen=True)
class SkipDecode:
    """SkipDecode's monotone per-position schedule: from decode position `start` on, the lowest `skip` LM
    layers do not run (the token's embedding enters layer `skip`; those layers' K/V for it is not written).

    A decode position counts the tokens fed to decode steps: 0 for the first generated token. Both columns
    strictly increase, so an earlier token always ran every layer a later token runs (its K/V exists).
    """

    stages: tuple[tuple[int, int], ...] = ()  # ((start, skip), ...)

    def skip_at(self, position: int) -> int:
        """Lowest layers skipped for the token at decode position `position`."""
        skip = 0
        for start, k in self.stages:
            if position >= start:
                skip = k
        return skip

    @property
    def skips(self) -> tuple[int, ...]:
        """Every skip count a decode step can run with, 0 included."""
        return (0, *(k for _, k in self.stages))

    def to_list(self) -> list[list[int]]:
        return [[start, k] for start, k in self.stages]

    @classmethod
    def from_manifest(cls, value: Any, num_layers: int) -> "SkipDecode":
        """From the manifest's `skip_decode` (untrusted; absent = None = no schedule). BUNDLE_INVALID names the fault."""
        if value is None:
            return cls()
        rows = checks.need_list(value, "manifest `skip_decode`", MAX_SKIP_STAGES)
        stages = []
        for row in rows:
            pair = checks.need_list(row, "manifest skip_decode[]", 2, 2)
            stages.append((checks.need_int(pair[0], "manifest skip_decode[][0] (position)", 0, MAX_SIZE),
                           checks.need_int(pair[1], "manifest skip_decode[][1] (layers)", 1, num_layers - 1)))
        for (p0, k0), (p1, k1) in zip(stages, stages[1:]):
            if not (p1 > p0 and k1 > k0):
                raise bundle_invalid(f"manifest `skip_decode` {checks.show(value)} is not monotone (positions and "
                                     "skipped layers must both increase); re-export the bundle")
        return cls(tuple(stages))


def per_layer_validity(shapes: Shapes, schedule: SkipDecode) -> bool:
    """Whether the decode/step graphs take one `cache_valid_<l>` per layer instead of one shared `cache_valid`.

    Per layer when layers hold different tokens: visual tokens dropped after a layer (each layer its own
    capacity C_l) or SkipDecode (skipped layers do not write a token). One input per layer rather than one
    [L, C] tensor: capacities differ per layer, and each input binds to its layer's cache buffer with no copy.
    Otherwise every layer holds the same tokens and one shared input keeps the graphs as they always were."""
    return shapes.drops_visual or bool(schedule.stages)


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
        """Trusted input (the exporter's own index); the runtime reads indexes with engine.read_weight_index."""
        return cls(d["name"], int(d["offset"]), int(d["length"]), str(d["dtype"]), tuple(int(x) for x in d["shape"]))


@dataclass(frozen=True)
class Manifest:
    root: Path
    data: dict[str, Any]
    shapes: Shapes
    files: dict[str, str]  # relative path -> sha256, every regular file of the bundle but manifest.json

    def path(self, rel: Any, where: str = "path") -> Path:
        """root/rel for a path the manifest names: relative, inside the bundle, no symlink, listed in `files`."""
        path = checks.inside(self.root, rel, f"manifest {where}")
        if rel not in self.files:
            raise bundle_invalid(f"manifest {where} = {checks.show(rel)} is not listed in `files` (so not hashed); "
                                 "re-export the bundle")
        return path

    @property
    def preprocess(self) -> dict:
        return self.data["preprocess"]

    @property
    def tokenizer(self) -> dict:
        return self.data["tokenizer"]

    @property
    def graphs(self) -> dict:
        return self.data["graphs"]

    @property
    def cache(self):
        """The `cache` section as a cache_policy.BundleCache (default policy, rotary frequencies, attn_mass)."""
        from edgeprune_runtime.cache_policy import BundleCache

        return BundleCache.from_manifest(self.data.get("cache"), self.shapes.head_dim, self.shapes.cache_capacity)

    @property
    def skip_decode(self) -> SkipDecode:
        return SkipDecode.from_manifest(self.data.get("skip_decode"), self.shapes.num_layers)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def bundle_root(bundle_dir: Any) -> Path:
    """The bundle directory as a Path; INVALID_ARGUMENT for a value that is not a path, BUNDLE_INVALID if absent."""
    try:
        raw = os.fspath(bundle_dir)
    except TypeError:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT,
                                 f"the bundle path must be a str or os.PathLike, got {type(bundle_dir).__name__}") from None
    if not isinstance(raw, str) or not raw or "\0" in raw:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"the bundle path must be a non-empty text path, got {checks.show(raw)}")
    root = Path(raw)
    if not root.is_dir():
        raise bundle_invalid(f"bundle directory {root} does not exist; create one with `edgeprune export`")
    return root


def read_manifest_data(root: Path) -> dict[str, Any]:
    """manifest.json of `root` parsed (bounded, strict JSON) and its schema version checked; nothing else.

    The toolchain uses it to tell an edgeprune bundle from any other directory."""
    mpath = root / MANIFEST_NAME
    if not os.path.lexists(mpath):
        raise bundle_invalid(f"{root} has no {MANIFEST_NAME}; it is not an edgeprune bundle (re-run `edgeprune export`)")
    data = checks.load_json(mpath, MAX_MANIFEST_BYTES, "manifest")
    if not isinstance(data, dict):
        raise bundle_invalid(f"{mpath} is not a JSON object; re-run `edgeprune export`")
    version = data.get("schema_version")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise bundle_invalid(
            f"bundle schema version {checks.show(version)} is not supported by this runtime (expects {SCHEMA_VERSION}); "
            "re-export the bundle with a matching edgeprune version"
        )
    return data


def listed_files(data: dict[str, Any]) -> dict[str, str]:
    """The manifest's `files` (relative path -> sha256), every key a safe relative path."""
    files = checks.need_dict(data.get("files"), "manifest `files`")
    for rel, digest in files.items():
        checks.relative_path(rel, f"manifest `files` entry {checks.show(rel)}")
        if rel == MANIFEST_NAME:
            raise bundle_invalid(f"manifest `files` lists {MANIFEST_NAME} itself; re-export the bundle")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise bundle_invalid(f"manifest `files` entry {checks.printable(rel)} has sha256 {checks.show(digest)}, not 64 hex digits; re-export")
    return files


def bundle_inventory(root: Path) -> list[str]:
    """Every regular file under `root` (relative POSIX paths, sorted), without following anything.

    Raises BUNDLE_INVALID for a symlink, FIFO, socket or device anywhere in the bundle."""
    found, stack, seen = [], [(root, "")], 0
    while stack:
        directory, prefix = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except OSError as e:
            raise bundle_invalid(f"cannot list {directory}: {e.strerror}") from None
        for entry in entries:
            seen += 1
            if seen > MAX_BUNDLE_ENTRIES:
                raise bundle_invalid(f"{root} holds more than {MAX_BUNDLE_ENTRIES} entries; it is not a bundle")
            rel = prefix + entry.name
            if entry.is_symlink():
                raise bundle_invalid(f"bundle entry {checks.printable(rel)} is a symlink; a bundle holds regular files only (copy the file in)")
            if entry.is_dir(follow_symlinks=False):
                stack.append((Path(entry.path), rel + "/"))
            elif entry.is_file(follow_symlinks=False):
                found.append(rel)
            else:
                raise bundle_invalid(f"bundle entry {checks.printable(rel)} is not a regular file or directory; remove it")
    return sorted(found)


def _file_references(data: dict[str, Any]):
    """(where, path) for every file key under FILE_SECTIONS, at any depth."""
    stack = [(section, data[section]) for section in FILE_SECTIONS if section in data]
    while stack:
        where, node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, value in items:
            at = f"{where}.{key}"
            if isinstance(value, (dict, list)):
                stack.append((at, value))
            elif isinstance(key, str) and is_file_key(key) and value is not None:
                yield at, value


def _check_tokenizer_and_template(data: dict[str, Any], shapes: Shapes) -> None:
    tok = checks.need_dict(data["tokenizer"], "manifest `tokenizer`")
    for key in ("file", "image_token", "image_token_id", "eos_token_ids"):
        if key not in tok:
            raise bundle_invalid(f"manifest `tokenizer` lacks {key!r}; re-export the bundle")
    image_token = checks.need_str(tok["image_token"], "manifest tokenizer.image_token", 256)
    checks.need_int(tok["image_token_id"], "manifest tokenizer.image_token_id", 0, shapes.vocab_size - 1)
    for i in checks.need_list(tok["eos_token_ids"], "manifest tokenizer.eos_token_ids", 64):
        checks.need_int(i, "manifest tokenizer.eos_token_ids[]", 0, shapes.vocab_size - 1)
    template = checks.need_str(data["prompt_template"], "manifest `prompt_template`", 1 << 16)
    if template.count(image_token) != 1 or template.count("{prompt}") != 1:
        raise bundle_invalid(f"manifest `prompt_template` must contain {image_token!r} and '{{prompt}}' once each, "
                             f"got {checks.show(template)}; re-export")


def _check_graphs(data: dict[str, Any]) -> None:
    graphs = checks.need_dict(data["graphs"], "manifest `graphs`")
    # the step graph is optional (bundles from before it existed); when named, it is checked like the others
    for name in ("vision", "prefill", "decode", *(("step",) if "step" in graphs else ())):
        entry = checks.need_dict(graphs.get(name), f"manifest graphs.{name}")
        if "file" not in entry:
            raise bundle_invalid(f"manifest graphs.{name} lacks 'file'; re-export the bundle")
    checks.need_str(graphs.get("lm_weights"), "manifest graphs.lm_weights", checks.MAX_PATH_CHARS)


def _check_skip_decode(data: dict[str, Any], shapes: Shapes) -> None:
    """The schedule parses and every skip count it uses has its decode graph (graphs.decode_skip.<k>.file)."""
    schedule = SkipDecode.from_manifest(data.get("skip_decode"), shapes.num_layers)
    graphs = data["graphs"].get("decode_skip", {}) if schedule.stages else {}
    for k in schedule.skips[1:]:
        entry = checks.need_dict(checks.need_dict(graphs, "manifest graphs.decode_skip").get(str(k)),
                                 f"manifest graphs.decode_skip.{k}")
        if "file" not in entry:
            raise bundle_invalid(f"manifest graphs.decode_skip.{k} lacks 'file'; re-export the bundle")


def load_manifest(bundle_dir: str | Path, verify_hashes: bool = True) -> Manifest:
    """Reads and checks `bundle_dir/manifest.json` and the bundle around it (untrusted input).

    Raises RuntimeStatusError naming the problem: INVALID_ARGUMENT for a `bundle_dir` that is not a path;
    BUNDLE_INVALID for a missing directory or manifest, malformed JSON, an unknown schema version, a missing
    key or a value of the wrong type or out of bounds, a path that is absolute, climbs out or passes a
    symlink, a symlink or special file in the bundle, a file that is not listed in `files` or listed and
    missing, or a file whose sha256 differs (`verify_hashes=False` skips only the hashing).
    """
    root = bundle_root(bundle_dir)
    data = read_manifest_data(root)
    for key in ("source", "recipe", "shapes", "preprocess", "tokenizer", "graphs", "files", "prompt_template"):
        if key not in data:
            raise bundle_invalid(f"{root / MANIFEST_NAME} lacks the key {key!r}; re-run `edgeprune export`")
    for key in ("source", "recipe", "preprocess"):
        checks.need_dict(data[key], f"manifest `{key}`")
    shapes = Shapes.from_dict(data["shapes"])
    _check_tokenizer_and_template(data, shapes)
    _check_graphs(data)
    _check_skip_decode(data, shapes)
    files = listed_files(data)
    manifest = Manifest(root, data, shapes, files)
    manifest.cache  # BUNDLE_INVALID for a malformed `cache` section
    for where, rel in _file_references(data):
        manifest.path(rel, where)
    manifest.path(data["graphs"]["lm_weights"] + ".json", "graphs.lm_weights index (<lm_weights>.json)")

    present = bundle_inventory(root)
    unlisted = [rel for rel in present if rel not in files and rel != MANIFEST_NAME]
    if unlisted:
        raise bundle_invalid(f"bundle file {checks.printable(unlisted[0])} is not listed in manifest `files` (every file is listed with its "
                             f"sha256); move it out of {root} or re-export")
    missing = sorted(set(files) - set(present))
    if missing:
        raise bundle_invalid(f"bundle file {checks.printable(missing[0])} is missing from {root}; re-run `edgeprune export`")
    if verify_hashes:
        for rel, digest in sorted(files.items()):
            try:
                ok = sha256_file(root / rel) == digest
            except OSError as e:
                raise bundle_invalid(f"cannot read bundle file {checks.printable(rel)}: {e.strerror}") from None
            if not ok:
                raise bundle_invalid(f"bundle file {checks.printable(rel)} does not match its sha256 in the manifest (modified or corrupt); re-export")
    return manifest
