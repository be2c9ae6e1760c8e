"""The bundle as untrusted input (issue 12): each reproduction of the issue gives one status with a one-line
message, reads nothing outside the bundle and allocates nothing beyond the budget; good inputs still work.

The fuzz suite (tests/fuzz/) checks the same properties over generated inputs; these are the named cases.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tracemalloc
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeprune_runtime import Bundle, RuntimeStatusError, Status, capi
from edgeprune_runtime.budget import request_bytes
from edgeprune_runtime.capi import Out
from edgeprune_runtime.generator import GeneratorParams, LoadedBundle
from edgeprune_runtime.preprocess import load_image
from edgeprune_runtime.sampling import Sampler

PROMPT = "What is in the picture?"


def manifest(root) -> dict:
    return json.loads((root / "manifest.json").read_text())


def write_manifest(root, data) -> None:
    (root / "manifest.json").write_text(json.dumps(data))


def edit(root, change) -> None:
    """Applies `change(manifest dict)` in place and writes the manifest back."""
    data = manifest(root)
    change(data)
    write_manifest(root, data)


def rehash(root, rel) -> None:
    """Re-lists `rel` with its current sha256, so that what a test checks is not the hash check."""
    data = manifest(root)
    data["files"][rel] = hashlib.sha256((root / rel).read_bytes()).hexdigest()
    write_manifest(root, data)


def refused(root, status=Status.BUNDLE_INVALID, **options) -> str:
    """Bundle_Create's status and message (one line), asserting no handle was made."""
    out = Out()
    got = capi.Bundle_Create(str(root), out, **options)
    message = capi.GetLastError()
    assert got == status, (got, message)
    assert out.value is None
    assert message and "\n" not in message and "Traceback" not in message
    return message


def loads(root, **options) -> None:
    with Bundle(root, **options) as bundle:
        assert bundle.shapes.cache_capacity > 0


@pytest.fixture
def outside(tmp_path, fake_bundle):
    """A directory beside the bundle holding valid copies of its files (what an escaping path would reach)."""
    root, _ = fake_bundle
    d = tmp_path / "outside"
    shutil.copytree(root, d)
    return d


# --- paths: relative, inside, no symlink, every file listed ------------------------------------------


@pytest.mark.parametrize("key, value", [
    ("tokenizer.file", "ABS/tokenizer.json"),
    ("graphs.vision.file", "/etc/passwd"),
    ("graphs.vision.file", "../outside/vision/vision.onnx"),
    ("graphs.prefill.file", "lm/../../outside/lm/prefill.onnx"),
    ("graphs.lm_weights", "./lm/lm.weights"),
    ("tokenizer.file", "lm//lm.weights"),
])
def test_manifest_paths_must_stay_inside(fake_bundle, outside, key, value):
    root, _ = fake_bundle
    value = value.replace("ABS", str(outside))
    section, *rest = key.split(".")

    def change(d):
        node = d[section]
        for k in rest[:-1]:
            node = node[k]
        node[rest[-1]] = value

    edit(root, change)
    assert "relative path inside the bundle" in refused(root)


def test_a_symlinked_file_is_refused_even_with_the_right_hash(fake_bundle, outside):
    root, _ = fake_bundle
    (root / "tokenizer.json").unlink()
    (root / "tokenizer.json").symlink_to(outside / "tokenizer.json")  # same bytes: the sha256 in `files` matches
    assert "symlink" in refused(root)


def test_a_symlinked_directory_is_refused(fake_bundle, outside):
    root, _ = fake_bundle
    shutil.rmtree(root / "lm")
    (root / "lm").symlink_to(outside / "lm", target_is_directory=True)
    assert "symlink" in refused(root)


def test_an_unlisted_corrupt_file_is_refused_not_run(fake_bundle, images):
    """The issue: drop lm/lm.weights from `files`, corrupt it, and `run` used to exit 0 with garbage."""
    root, _ = fake_bundle
    edit(root, lambda d: d["files"].pop("lm/lm.weights"))
    with open(root / "lm" / "lm.weights", "r+b") as f:
        f.seek(64)
        f.write(b"\xff" * 64)
    for verify in (True, False):  # listing is checked even when hashing is skipped
        message = refused(root, verify_hashes=verify)
        assert "lm/lm.weights" in message and "not listed" in message


def test_any_unlisted_file_is_refused(fake_bundle):
    root, _ = fake_bundle
    (root / "vision" / "notes.txt").write_text("left behind")
    assert "vision/notes.txt is not listed" in refused(root)


def test_a_listed_missing_file_is_refused(fake_bundle):
    root, _ = fake_bundle
    (root / "vision" / "vision.weights").unlink()
    assert "vision/vision.weights is missing" in refused(root)


def test_a_fifo_in_the_bundle_is_refused_without_blocking(fake_bundle):
    root, _ = fake_bundle
    os.mkfifo(root / "lm" / "pipe")
    assert "lm/pipe is not a regular file" in refused(root)


def test_file_keys_in_any_section_are_confined(fake_bundle):
    """engines/graphs entries added later (`edgeprune build`) are checked generically, by key name."""
    root, _ = fake_bundle
    edit(root, lambda d: d.update(engines={"rtx": {"file": "../../x.engine", "sha256": "0" * 64}}))
    assert "engines.rtx.file" in refused(root)
    edit(root, lambda d: d["graphs"].update(step={"file": "lm/step.onnx"}))
    edit(root, lambda d: d.update(engines={}))
    assert "graphs.step.file" in refused(root) and "not listed" in refused(root)


def test_listed_engines_and_extra_graphs_are_accepted(fake_bundle):
    root, _ = fake_bundle
    (root / "engines" / "rtx").mkdir(parents=True)
    (root / "engines" / "rtx" / "lm.engine").write_bytes(b"plan")
    shutil.copy(root / "lm" / "decode.onnx", root / "lm" / "step.onnx")
    edit(root, lambda d: d.update(
        engines={"rtx": {"lm": {"file": "engines/rtx/lm.engine", "size": 4}}}, targets={"rtx": {}},
        onnx={"opset": 21, "precision": "fp16"}, graphs=d["graphs"] | {"step": {"file": "lm/step.onnx"}}))
    rehash(root, "engines/rtx/lm.engine")
    rehash(root, "lm/step.onnx")
    loads(root)


# --- numbers: typed, bounded, consistent with each other and with the graphs -------------------------


def _shapes(**changes):
    return lambda d: d["shapes"].update(changes)


def _preprocess(**changes):
    return lambda d: d["preprocess"].update(changes)


@pytest.mark.parametrize("change, words", [
    (_shapes(newline_slots=10 ** 9), "shapes.newline_slots must be an integer in [0, 16777216]"),
    (_shapes(newline_slots=10 ** 6), "visual_slots == visual_topk + newline_slots"),
    (_preprocess(shortest_edge=10 ** 6), "preprocess.shortest_edge must be an integer"),
    (_shapes(patch_grid=10 ** 6), "patches_per_partition == patch_grid**2"),
    (_shapes(partitions=10 ** 6), "preprocess.partitions == shapes.partitions"),
    (_preprocess(partitions=10 ** 6), "preprocess.partitions must be an integer in [1, 32768]"),
    (lambda d: (d["shapes"].update(partitions=30_000), d["preprocess"].update(partitions=30_000)), "has shape"),
    (_shapes(visual_topk=10 ** 6, visual_slots=10 ** 6 + 12), "visual_topk <= partitions * patches_per_partition"),
    (_shapes(cache_capacity=448.0), "shapes.cache_capacity must be an integer"),
    (_shapes(patch_grid=0), "shapes.patch_grid must be an integer in [1,"),
    (_shapes(kv_heads=[2, "1"]), "shapes.kv_heads[] must be an integer"),
    (lambda d: d.update(files=list(d["files"])), "`files` must be a JSON object"),
    (lambda d: d["tokenizer"].update(eos_token_ids=["x"]), "eos_token_ids[] must be an integer"),
    (lambda d: d["tokenizer"].update(image_token_id=True), "image_token_id must be an integer"),
    (lambda d: d.update(schema_version=True), "schema version True"),
    (lambda d: d["preprocess"].update(image_std=[0.5, 0.5, 0.0]), "image_std has a zero"),
    (lambda d: d["preprocess"].update(image_grid_pinpoints=[[28, 56.0]]), "image_grid_pinpoints[][] must be an integer"),
    (lambda d: d.update(prompt_template="no image here {prompt}"), "prompt_template"),
    (lambda d: d["files"].update({"lm/decode.onnx": "abc"}), "not 64 hex digits"),
])
def test_numbers_are_typed_and_bounded_before_any_allocation(fake_bundle, change, words):
    root, _ = fake_bundle
    edit(root, change)
    tracemalloc.start()
    try:
        message = refused(root)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert words in message
    assert peak < 16 << 20, f"refusing the manifest allocated {peak} bytes"


def test_consistent_but_huge_sizes_meet_the_graphs(fake_bundle):
    """A cache of 16 million slots passes every rule between the manifest's own numbers: the graphs refuse it."""
    root, _ = fake_bundle
    edit(root, _shapes(cache_capacity=1 << 24))
    assert "decode graph input 'cache_valid' has shape" in refused(root)


JSON_BOMBS = [
    (lambda text: text[:-1] + ', "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested too deeply"),
    (lambda text: text[:-1] + ', "x": ' + "[" * 100 + "]" * 100 + "}", "nests deeper than 64"),
    (lambda text: text.replace('"schema_version": 1', '"schema_version": NaN'), "malformed JSON"),
    (lambda text: text[:-1] + ', "x": ' + "9" * 5000 + "}", "malformed JSON"),  # past Python's int digit limit
    (lambda text: text[:-1] + ', "x": "\udcff"}', None),  # invalid UTF-8 written as a lone surrogate escape
]


@pytest.mark.parametrize("bomb, words", JSON_BOMBS)
def test_json_bombs(fake_bundle, bomb, words):
    root, _ = fake_bundle
    text = bomb((root / "manifest.json").read_text())
    if words is None:
        (root / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape"))
        words = "malformed JSON"
    else:
        (root / "manifest.json").write_text(text)
    assert words in refused(root)


WEIGHT_CHANGES = [
    (lambda t: t.update(dtype="O"), "unknown dtype"),
    (lambda t: t.update(dtype="<U4"), "unknown dtype"),
    (lambda t: t.update(dtype=">f4"), "unknown dtype"),
    (lambda t: t.update(dtype=["<f4"]), "unknown dtype"),
    (lambda t: t.update(shape=[-1, 4]), "shape must be an integer in [0,"),
    (lambda t: t.update(shape=[2.0, 3]), "shape must be an integer"),
    (lambda t: t.update(shape=[[1]]), "shape must be an integer"),
    (lambda t: t.update(shape=[1] * 9), "shape must be a list of 0 to 8"),
    (lambda t: t.update(length=t["length"] + 10 ** 12, shape=[t["length"] // 4 + 250_000_000_000]), "lies outside"),
    (lambda t: t.update(offset=-8), "offset must be an integer in [0,"),
    (lambda t: t.update(name=7), "tensor name must be a string"),
]


@pytest.mark.parametrize("change, words", WEIGHT_CHANGES)
def test_weight_index_is_validated_strictly(fake_bundle, change, words):
    root, _ = fake_bundle
    path = root / "lm" / "lm.weights.json"
    index = json.loads(path.read_text())
    change(index["tensors"][0])
    path.write_text(json.dumps(index))
    rehash(root, "lm/lm.weights.json")
    assert words in refused(root)


def test_weight_index_duplicate_names(fake_bundle):
    root, _ = fake_bundle
    path = root / "lm" / "lm.weights.json"
    index = json.loads(path.read_text())
    index["tensors"].append(dict(index["tensors"][0]))
    path.write_text(json.dumps(index))
    rehash(root, "lm/lm.weights.json")
    assert "listed twice" in refused(root)


# --- the memory budget -----------------------------------------------------------------------------------


def test_the_kv_cache_part_of_the_budget_is_what_the_cache_allocates(fake_bundle):
    """Expected value from the buffers themselves: the budget's kv-cache part equals KVCache's nbytes."""
    root, _ = fake_bundle
    b = LoadedBundle(root)
    cache = b.engine.new_cache()
    allocated = sum(a.nbytes for a in cache.keys + cache.values + cache.valid)
    parts = request_bytes(b.shapes, b.preprocess_params, np.dtype(b.engine.cache_dtype).itemsize)
    assert parts["kv cache"] == allocated
    pixel_values = b.shapes.partitions * 3 * b.shapes.crop_size ** 2 * 4  # the float32 array preprocess returns
    assert parts["pixel values"] >= pixel_values


@pytest.fixture(scope="module")
def long_cache_bundle(tmp_path_factory):
    """A fake bundle whose KV cache alone is ~11 MiB (60000 slots of 2x3 heads x 8 x f32)."""
    from fake_bundle import make_fake_bundle

    root, _ = make_fake_bundle(tmp_path_factory.mktemp("long") / "bundle", new_slots=60_000)
    return root


def test_budget_refuses_a_bundle_that_does_not_fit(long_cache_bundle, monkeypatch):
    root = long_cache_bundle
    b = LoadedBundle(root)
    need_mb = math.ceil(b.request_bytes / 2 ** 20)
    assert need_mb >= 11
    message = refused(root, Status.RESOURCE_LIMIT, memory_budget_mb=need_mb - 1)
    assert "largest part: kv cache" in message and f"EDGEPRUNE_MEMORY_BUDGET_MB to {need_mb}" in message
    loads(root, memory_budget_mb=need_mb)
    monkeypatch.setenv("EDGEPRUNE_MEMORY_BUDGET_MB", str(need_mb - 1))
    assert "memory budget" in refused(root, Status.RESOURCE_LIMIT)
    monkeypatch.setenv("EDGEPRUNE_MEMORY_BUDGET_MB", "lots")
    assert "EDGEPRUNE_MEMORY_BUDGET_MB" in refused(root, Status.INVALID_ARGUMENT)
    monkeypatch.delenv("EDGEPRUNE_MEMORY_BUDGET_MB")
    assert "memory_budget_mb" in refused(root, Status.INVALID_ARGUMENT, memory_budget_mb=2.5)


def test_huge_preprocessing_sizes_hit_the_budget_not_the_allocator(fake_bundle):
    """shortest_edge within the per-value bound but 30000^2 pixels per partition: refused before allocation."""
    root, _ = fake_bundle
    edit(root, _preprocess(shortest_edge=30_000))
    tracemalloc.start()
    try:
        message = refused(root, Status.RESOURCE_LIMIT)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "preprocess partitions" in message and peak < 16 << 20


# --- images ------------------------------------------------------------------------------------------------


def _png_header_bomb(path, width, height):
    """A valid greyscale PNG of width x height black pixels, written row by row (small file, huge image)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    body = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path, fake_bundle):
    path = tmp_path / "bomb.png"
    _png_header_bomb(path, 12000, 12000)
    assert path.stat().st_size < 300_000
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(RuntimeStatusError) as e:
        load_image(path)
    assert e.value.status == Status.IMAGE_INVALID and "144000000 pixels, over the limit" in e.value.message
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: nothing was decoded
    # the limit is the caller's to raise, and the memory budget still applies
    with pytest.raises(RuntimeStatusError) as e:
        load_image(path, max_pixels=10 ** 9, max_bytes=64 << 20)
    assert e.value.status == Status.RESOURCE_LIMIT
    root, _ = fake_bundle
    with Bundle(root, max_image_pixels=1000) as bundle, pytest.raises(RuntimeStatusError) as e:
        bundle.generate(str(path), PROMPT, max_new_tokens=1)
    assert e.value.status == Status.IMAGE_INVALID


def _gradient(dtype, top, h=40, w=300):
    return np.tile(np.linspace(0, top, w), (h, 1)).astype(dtype)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    source = _gradient(np.uint16, 65535)
    path = tmp_path / "g16.png"
    Image.fromarray(source).save(path)
    with Image.open(path) as raw:
        assert raw.mode == "I;16"  # what Pillow opens; its own convert("RGB") would clip almost all to white
    rgb = np.asarray(load_image(path)).astype(int)
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()
    assert np.abs(rgb[..., 0] - (source >> 8)).max() <= 1  # the high byte is the 8-bit value
    assert (rgb == 255).mean() < 0.01


@pytest.mark.parametrize("dtype, top", [(np.int32, 2 ** 31 - 1), (np.int32, 65535), (np.float32, 1.0), (np.float32, 255.0)])
def test_32_bit_tiff_spans_the_8_bit_range(tmp_path, dtype, top):
    source = _gradient(dtype, top)
    path = tmp_path / "g32.tif"
    Image.fromarray(source).save(path)
    grey = np.asarray(load_image(path))[..., 0].astype(int)
    assert grey.min() == 0 and grey.max() == 255  # a full-range gradient stays full-range
    assert (np.diff(grey, axis=1) >= 0).all()  # and monotone
    assert abs(grey.mean() - 127.5) < 2  # not almost all white, not almost all black


@pytest.mark.parametrize("mode", Image.MODES)
def test_every_pillow_mode_converts(mode, fake_bundle):
    image = Image.new(mode, (50, 30))
    root, _ = fake_bundle
    with Bundle(root) as bundle:
        result = bundle.generate(image, PROMPT, max_new_tokens=1)
    assert len(result.token_ids) == 1


def test_premultiplied_la_is_composited_like_la():
    rng = np.random.default_rng(0)
    la = Image.fromarray(rng.integers(0, 256, (20, 30, 2), dtype=np.uint8), "LA")
    from edgeprune_runtime.preprocess import _convert_to_rgb

    assert np.array_equal(np.asarray(_convert_to_rgb(la.convert("La"))), np.asarray(_convert_to_rgb(la.convert("La").convert("LA"))))
    assert _convert_to_rgb(la.convert("La")).mode == "RGB"


# --- statuses through the C-shaped API ---------------------------------------------------------------


def test_create_with_values_that_are_not_paths():
    out = Out()
    for bad in (None, 3, b"bytes", ["x"], "", "a\0b", object()):
        assert capi.Bundle_Create(bad, out) == Status.INVALID_ARGUMENT, bad
        assert "bundle path" in capi.GetLastError()
    assert capi.Bundle_Create() == Status.INVALID_ARGUMENT  # the wrong arity is a status too
    assert "Bundle_Create" in capi.GetLastError()


@pytest.fixture
def bundle(fake_bundle):
    root, _ = fake_bundle
    out = Out()
    assert capi.Bundle_Create(str(root), out) == Status.OK
    yield out.value
    capi.Bundle_Destroy(out.value)


@pytest.mark.parametrize("prompt", ["caf\udcc3", "\ud800 lone high surrogate", "x" * (1 << 21)])
def test_prompts_that_are_not_utf8_text(bundle, images, prompt):
    out, params = Out(), Out()
    capi.GeneratorParams_Create(params)
    status = capi.Generator_Create(bundle, params.value, str(images["wide"]), prompt, False, out)
    capi.GeneratorParams_Destroy(params.value)
    assert status in (Status.INVALID_ARGUMENT, Status.PROMPT_TOO_LONG) and out.value is None
    assert "\n" not in capi.GetLastError()


@pytest.mark.parametrize("ids", [[-1], [2 ** 40], ["x"], [1.5], [True], [[1]], None, 5, "abc", np.zeros((2, 2), np.int64)])
def test_decode_tokens_refuses_what_is_not_a_token_id(bundle, ids):
    out = Out()
    assert capi.Bundle_DecodeTokens(bundle, ids, out) == Status.INVALID_ARGUMENT
    assert out.value is None


def test_a_bad_id_leaves_the_token_stream_working(bundle):
    fresh, stream, out = Out(), Out(), Out()
    capi.TokenizerStream_Create(bundle, stream)
    capi.TokenizerStream_Create(bundle, fresh)
    ids = [50, 60, 70]
    pieces = []
    for i, t in enumerate(ids):
        if i == 1:
            for bad in (-1, 2 ** 40, "7", None):
                assert capi.TokenizerStream_Decode(stream.value, bad, out) == Status.INVALID_ARGUMENT
        assert capi.TokenizerStream_Decode(stream.value, t, out) == Status.OK
        pieces.append(out.value)
    expected = []
    for t in ids:
        capi.TokenizerStream_Decode(fresh.value, t, out)
        expected.append(out.value)
    assert pieces == expected
    assert capi.Bundle_DecodeTokens(bundle, ids, out) == Status.OK and out.value == "".join(expected)
    capi.TokenizerStream_Destroy(stream.value)
    capi.TokenizerStream_Destroy(fresh.value)


def test_a_pil_image_in_mode_La(bundle):
    out, params = Out(), Out()
    capi.GeneratorParams_Create(params)
    capi.GeneratorParams_SetMaxNewTokens(params.value, 1)
    image = Image.new("La", (40, 40))
    assert capi.Generator_Create(bundle, params.value, image, PROMPT, False, out) == Status.OK
    assert capi.Generator_GenerateNextToken(out.value) == Status.OK
    capi.Generator_Destroy(out.value)
    capi.GeneratorParams_Destroy(params.value)


def test_handles_are_never_bools(bundle):
    out = Out()
    assert capi.Bundle_GetShapes(True, out) == Status.INVALID_ARGUMENT  # True == 1, a live handle's number


# --- sampling -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1e-320, 5e-324, 1e-300, 1e300])
def test_extreme_temperatures_sample_without_nan(temperature):
    logits = np.random.default_rng(0).standard_normal(512).astype(np.float32) * 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's overflow/invalid warnings would fail the test
        tokens = [Sampler(temperature, 0.9, seed)(logits) for seed in range(50)]
    if temperature < 1e-200:  # the T -> 0 limit of softmax(l / T) is the argmax
        assert set(tokens) == {int(np.argmax(logits))}
    else:
        assert len(set(tokens)) > 1 and all(0 <= t < 512 for t in tokens)


def test_non_finite_logits_are_a_status_not_a_token():
    logits = np.zeros(8, np.float32)
    logits[3] = np.nan
    for temperature in (0.0, 1.0):
        with pytest.raises(RuntimeStatusError) as e:
            Sampler(temperature, 1.0, 0)(logits)
        assert e.value.status == Status.INFERENCE_FAILED and "token 3" in e.value.message


@pytest.mark.parametrize("field, value", [("temperature", float("nan")), ("temperature", True), ("top_p", float("nan")),
                                          ("top_p", 0.0), ("max_new_tokens", True), ("ignore_eos", np.array([1, 2])),
                                          ("seed", -1), ("temperature", "0.5")])
def test_sampling_parameters_are_validated(field, value):
    with pytest.raises(RuntimeStatusError) as e:
        GeneratorParams(**{field: value}).check()
    assert e.value.status == Status.INVALID_ARGUMENT


@pytest.mark.parametrize("location", ["../../outside/vision/vision.weights", "ABS"])
def test_graph_external_data_outside_the_bundle_is_refused(fake_bundle, outside, location):
    """Graph weights live in external-data files that ONNX Runtime opens itself; it must refuse locations that
    leave the model's directory (a property of the installed onnxruntime that this runtime relies on)."""
    onnx = pytest.importorskip("onnx")
    root, _ = fake_bundle
    path = root / "vision" / "vision.onnx"
    model = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    entry = next(e for e in tensor.external_data if e.key == "location")
    entry.value = str(outside / "vision" / "vision.weights") if location == "ABS" else location
    onnx.save(model, str(path))
    rehash(root, "vision/vision.onnx")
    message = refused(root)
    assert "cannot load vision graph" in message and "External data" in message


_MEASURE = r"""
import json, sys
from edgeprune_runtime.preprocess import PreprocessParams, load_image, preprocess

def kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])

params = PreprocessParams.from_dict(json.loads(open(sys.argv[2]).read())["preprocess"])
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM)
base = kb("VmRSS")
preprocess(load_image(sys.argv[1]), params)
print((kb("VmHWM") - base) * 1024)
"""


@pytest.mark.parametrize("width, height, mode", [(2000, 1500, "RGBA"), (1500, 1000, "I;16"), (1500, 1000, "P"),
                                                 (1500, 1000, "F"), (1, 400_000, "RGBA"), (400_000, 1, "RGB")])
def test_the_image_memory_estimate_bounds_what_decoding_uses(tmp_path, fake_bundle, width, height, mode):
    """Expected value from outside the formula: the peak resident memory of a fresh process that loads and
    preprocesses the image stays under budget.image_bytes (which the budget check charges before decoding)."""
    import subprocess
    import sys

    from edgeprune_runtime.budget import image_bytes

    if not os.path.exists("/proc/self/clear_refs"):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident set")
    rng = np.random.default_rng(0)
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
    elif mode == "F":
        image = Image.fromarray(rng.random((height, width), dtype=np.float32))
    elif mode == "P":
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).quantize(16)
        image.info["transparency"] = 0
    else:
        image = Image.fromarray(rng.integers(0, 256, (height, width, len(mode)), dtype=np.uint8), mode)
    path = tmp_path / ("image.tif" if mode == "F" else "image.png")
    image.save(path, **({"compress_level": 1} if path.suffix == ".png" else {}))
    root, _ = fake_bundle
    runtime = Path(__file__).resolve().parents[2] / "runtime"
    proc = subprocess.run([sys.executable, "-c", _MEASURE, str(path), str(root / "manifest.json")], capture_output=True,
                          text=True, timeout=120, env={"PYTHONPATH": str(runtime), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    grew = int(proc.stdout)
    assert grew <= image_bytes(width, height) + (8 << 20), (grew, image_bytes(width, height))


def test_decode_outputs_of_another_type_are_refused_at_load(fake_bundle):
    """The decoder binds float32 logits once; a graph that returns float16 logits is refused when loading,
    not met later as an error in the middle of a request."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    root, _ = fake_bundle
    path = root / "lm" / "decode.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for node in model.graph.node:
        node.output[:] = ["logits_f32" if o == "logits" else o for o in node.output]
    model.graph.node.append(helper.make_node("Cast", ["logits_f32"], ["logits"], to=TensorProto.FLOAT16))
    next(o for o in model.graph.output if o.name == "logits").type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.save(model, str(path))
    rehash(root, "lm/decode.onnx")
    assert "decode graph 'logits' has type tensor(float16)" in refused(root)


def test_a_file_name_with_a_newline_keeps_the_message_on_one_line(fake_bundle):
    root, _ = fake_bundle
    (root / "evil\nname").write_text("x")
    assert "'evil\\nname' is not listed" in refused(root)


# --- the step graph (follow-ups, exact boundaries): checked like the others, its outputs at every run ---------


@pytest.mark.parametrize("step", [{}, "x", [], {"dynamic": {}}])
def test_a_step_entry_that_is_not_a_graph_is_refused_at_load(fake_bundle, step):
    root, _ = fake_bundle
    edit(root, lambda d: d["graphs"].__setitem__("step", step))
    assert "graphs.step" in refused(root)


def _handles(root):
    """(bundle, params handle with max_new_tokens 2, an Out) on `root`; the caller destroys the handles."""
    out = Out()
    assert capi.Bundle_Create(str(root), out) == Status.OK, capi.GetLastError()
    bundle = out.value
    capi.GeneratorParams_Create(out)
    params = out.value
    capi.GeneratorParams_SetMaxNewTokens(params, 2)
    return bundle, params, out


def _follow_up_status(root, image) -> tuple[Status, str]:
    """The status and message of a follow-up after a two-token first turn on the bundle at `root`."""
    bundle, params, out = _handles(root)
    try:
        assert capi.Generator_Create(bundle, params, str(image), PROMPT, False, out) == Status.OK, capi.GetLastError()
        gen = out.value
        while capi.Generator_IsDone(gen, out) == Status.OK and not out.value:
            assert capi.Generator_GenerateNextToken(gen) == Status.OK
        status = capi.Generator_CreateFollowUp(gen, params, "And what color is it?", False, out)
        message = capi.GetLastError()
        if status == Status.OK:
            capi.Generator_Destroy(out.value)
        capi.Generator_Destroy(gen)
        return status, message
    finally:
        capi.GeneratorParams_Destroy(params)
        capi.Bundle_Destroy(bundle)


def test_a_step_entry_naming_another_graph_fails_its_contract(fake_bundle, images):
    """graphs.step pointing at the decode graph (listed, hashed, loadable): the contract check names what is missing
    before anything runs (it used to reach ORT and come back as INFERENCE_FAILED)."""
    root, _ = fake_bundle
    edit(root, lambda d: d["graphs"].__setitem__("step", {"file": "lm/decode.onnx"}))
    status, message = _follow_up_status(root, images["wide"])
    assert status == Status.BUNDLE_INVALID and "step graph lacks the input 'token_ids'" in message
    assert "\n" not in message


def _tamper_step(root, output: str, axis: int, end: int, declared=None, cast=None) -> None:
    """Rewrites lm/step.onnx so that `output` is cut to [:end] on `axis` (or cast to `cast`) while its declared shape
    stays (or becomes `declared`), and re-lists the file: a hostile graph whose outputs lie about their shape."""
    onnx = pytest.importorskip("onnx")
    from onnx import helper

    path = root / "lm" / "step.onnx"
    model = onnx.load(str(path), load_external_data=False)  # the weights stay in lm/lm.weights
    inner = output + "_inner"
    for node in model.graph.node:  # the graph's own nodes keep using the true tensor
        node.output[:] = [inner if o == output else o for o in node.output]
        node.input[:] = [inner if i == output else i for i in node.input]
    if cast is not None:
        model.graph.node.append(helper.make_node("Cast", [inner], [output], to=cast))
        next(o for o in model.graph.output if o.name == output).type.tensor_type.elem_type = cast
    else:
        consts = {"_starts": 0, "_end": end, "_axes": axis, "_zero": 0}
        for suffix, value in consts.items():
            model.graph.node.append(helper.make_node("Constant", [], [output + suffix],
                                                     value=helper.make_tensor(output + suffix, onnx.TensorProto.INT64, [1], [value])))
        # end + 0 * position: not a constant, so ORT cannot infer the cut shape and report it at load
        model.graph.node.append(helper.make_node("Mul", ["position", output + "_zero"], [output + "_off"]))
        model.graph.node.append(helper.make_node("Add", [output + "_end", output + "_off"], [output + "_ends"]))
        model.graph.node.append(helper.make_node("Slice", [inner, output + "_starts", output + "_ends", output + "_axes"],
                                                 [output]))
    if declared is not None:
        dims = next(o for o in model.graph.output if o.name == output).type.tensor_type.shape.dim
        for dim, value in zip(dims, declared):
            if isinstance(value, int):
                dim.dim_value = value
    onnx.save(model, str(path))
    rehash(root, "lm/step.onnx")


@pytest.fixture
def tiny_copy(tiny_bundles, tmp_path):
    dst = tmp_path / "tiny"
    shutil.copytree(tiny_bundles[0.2], dst)
    return dst


@pytest.mark.parametrize("output, axis, end, declared, cast, words", [
    # run time: outputs that lie about their declared shape (kv_heads[0] = 2 heads, 512 logits, T rows)
    ("new_key_0", 0, 1, None, None, "'new_key_0' of shape [1, "),  # 1 head: would broadcast into both cache heads
    ("new_value_1", 1, 1, None, None, "'new_value_1' of shape [2, 1, 32]"),  # 1 row for T slots: desyncs the cache
    ("logits", 0, 500, None, None, "'logits' of shape [500]"),
    # load time: declared shapes and types outside the contract
    ("new_key_0", 0, 1, [1], None, "step graph output 'new_key_0' has shape [1, 'T', 32]"),
    ("logits", 0, 0, None, 10, "step graph 'logits' has type tensor(float16)"),
])
def test_a_step_graph_outside_its_contract_is_a_bundle_error(tiny_copy, images, output, axis, end, declared, cast, words):
    _tamper_step(tiny_copy, output, axis, end, declared, cast)
    status, message = _follow_up_status(tiny_copy, images["wide"])
    assert status == Status.BUNDLE_INVALID, (status, message)
    assert words in message and "\n" not in message
