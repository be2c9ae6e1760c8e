"""load_manifest: every way a bundle directory can be wrong gives BUNDLE_INVALID naming the problem."""

import hashlib
import json

import pytest

from edgeprune_runtime.errors import RuntimeStatusError, Status
from edgeprune_runtime.manifest import SCHEMA_VERSION, Shapes, load_manifest

SHAPES = dict(partitions=5, crop_size=28, patch_grid=2, patches_per_partition=4, visual_topk=6, newline_slots=4,
              visual_slots=10, text_slots_before_image=8, text_slots_after_image=16, prefill_slots=34,
              cache_capacity=46, hidden_size=16, vocab_size=300, num_layers=2, kv_heads=[2, 1], head_dim=8)


FILES = {"lm/decode.onnx": b"graph bytes", "lm/prefill.onnx": b"prefill", "vision/vision.onnx": b"vision",
         "lm/lm.weights": b"weights", "lm/lm.weights.json": b"{}", "tokenizer.json": b"{}"}


def write_bundle(root, **overrides):
    """A bundle whose manifest is complete; its files are placeholders (load_manifest does not parse them)."""
    for rel, content in FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    data = {
        "schema_version": SCHEMA_VERSION, "source": {"model": "fake"}, "recipe": {"budget": 0.5}, "shapes": SHAPES, "preprocess": {},
        "tokenizer": {"file": "tokenizer.json", "image_token": "<image>", "image_token_id": 4, "eos_token_ids": [2]},
        "graphs": {"vision": {"file": "vision/vision.onnx"}, "prefill": {"file": "lm/prefill.onnx"},
                   "decode": {"file": "lm/decode.onnx"}, "lm_weights": "lm/lm.weights"},
        "prompt_template": "USER: <image>\n{prompt} ASSISTANT:",
        "files": {rel: hashlib.sha256(content).hexdigest() for rel, content in FILES.items()},
    }
    data.update(overrides)
    (root / "manifest.json").write_text(json.dumps(data))
    return root


def invalid(path, **kw) -> str:
    with pytest.raises(RuntimeStatusError) as e:
        load_manifest(path, **kw)
    assert e.value.status == Status.BUNDLE_INVALID
    return e.value.message


def test_good_bundle_loads(tmp_path):
    m = load_manifest(write_bundle(tmp_path / "b"))
    assert m.shapes == Shapes.from_dict(SHAPES)
    assert m.shapes.kv_heads == (2, 1)
    assert m.path("lm/decode.onnx").read_bytes() == b"graph bytes"


def test_missing_directory(tmp_path):
    assert "does not exist" in invalid(tmp_path / "nope")


def test_missing_manifest(tmp_path):
    (tmp_path / "b").mkdir()
    assert "no manifest.json" in invalid(tmp_path / "b")


def test_malformed_json(tmp_path):
    root = write_bundle(tmp_path / "b")
    (root / "manifest.json").write_text('{"schema_version": 1, ')
    assert "malformed JSON" in invalid(root)


def test_not_an_object(tmp_path):
    root = write_bundle(tmp_path / "b")
    (root / "manifest.json").write_text("[1, 2]")
    assert "not a JSON object" in invalid(root)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_unknown_schema_version(tmp_path, version):
    msg = invalid(write_bundle(tmp_path / "b", schema_version=version))
    assert "schema version" in msg and repr(version) in msg


def test_missing_key(tmp_path):
    root = write_bundle(tmp_path / "b")
    data = json.loads((root / "manifest.json").read_text())
    del data["prompt_template"]
    (root / "manifest.json").write_text(json.dumps(data))
    assert "'prompt_template'" in invalid(root)


def test_malformed_shapes(tmp_path):
    assert "lacks ['crop_size'" in invalid(write_bundle(tmp_path / "b", shapes={"partitions": 5}))


def test_listed_file_missing(tmp_path):
    root = write_bundle(tmp_path / "b")
    (root / "lm" / "decode.onnx").unlink()
    assert "lm/decode.onnx is missing" in invalid(root)


def test_tampered_file(tmp_path):
    root = write_bundle(tmp_path / "b")
    (root / "lm" / "decode.onnx").write_bytes(b"graph bytez")
    assert "lm/decode.onnx does not match its sha256" in invalid(root)
    assert load_manifest(root, verify_hashes=False).shapes.num_layers == 2  # only the hashing is skipped
