"""Sessions, the LM weights shared through one memory map, and the graph-contract checks."""

import json

import numpy as np
import pytest

from edgeprune_runtime.engine import Engine
from edgeprune_runtime.errors import RuntimeStatusError, Status
from edgeprune_runtime.manifest import load_manifest
from fake_bundle import set_manifest


def engine(root) -> Engine:
    return Engine(load_manifest(root, verify_hashes=False))


def bundle_error(root, status=Status.BUNDLE_INVALID) -> str:
    with pytest.raises(RuntimeStatusError) as e:
        engine(root)
    assert e.value.status == status
    return e.value.message


def prefill_feeds(eng: Engine):
    s = eng.shapes
    t = s.text_slots_before_image + s.text_slots_after_image
    ids = np.arange(t, dtype=np.int64) % 50
    return ids, np.ones(t, np.float32), np.ones((s.visual_slots, s.hidden_size), np.float32), np.ones(s.visual_slots, np.float32)


def test_both_lm_sessions_read_the_one_memory_map(fake_bundle):
    """Zeroing `head` in the weights FILE after loading changes both graphs' logits: ORT reads our map, no copy."""
    root, lm = fake_bundle
    eng = engine(root)
    entry = next(t for t in eng.weights.entries if t.name == "head")
    assert np.shares_memory(eng.weights.arrays["head"], eng.weights.map)
    cache = eng.new_cache()
    logits, keys, values, _ = eng.run_prefill(*prefill_feeds(eng))
    cache.fill_from_prefill(keys, values, np.ones(eng.shapes.prefill_slots, np.float32))
    decoder = eng.decoder(cache)
    assert np.abs(logits).max() > 0 and np.abs(decoder.step(5)).max() > 0

    writer = np.memmap(root / "lm" / "lm.weights", dtype=np.uint8, mode="r+")
    writer[entry.offset:entry.offset + entry.length] = 0
    writer.flush()
    assert not eng.run_prefill(*prefill_feeds(eng))[0].any()
    assert not decoder.step(6).any()


def test_decoder_binds_the_cache_buffers_without_copies(fake_bundle):
    root, _ = fake_bundle
    eng = engine(root)
    cache = eng.new_cache()
    _, keys, values, _ = eng.run_prefill(*prefill_feeds(eng))
    cache.fill_from_prefill(keys, values, np.ones(eng.shapes.prefill_slots, np.float32))
    decoder = eng.decoder(cache)
    logits = decoder.step(7)
    assert logits is decoder.logits  # ORT wrote into the preallocated, bound output buffer
    before = logits.copy()
    cache.values[0][:, 0] += 1.0  # an in-place edit of the cache is seen by the next step: the input is bound, not copied
    cache.position -= 1  # replay the same token at the same position and slot
    decoder.steps -= 1
    for layer, valid in enumerate(cache.valid):
        cache.lengths[layer] -= 1
        valid[cache.lengths[layer]] = 0.0
    assert not np.allclose(decoder.step(7), before)


def test_weights_index_missing(fake_bundle):
    root, _ = fake_bundle
    (root / "lm" / "lm.weights.json").unlink()
    assert "lm.weights.json" in bundle_error(root)


@pytest.mark.parametrize("change, words", [
    (lambda t: t.update(offset=10 ** 9), "outside"),
    (lambda t: t.update(dtype="float99"), "unknown dtype"),
    (lambda t: t.update(shape=[3, 3]), "another size"),
    (lambda t: t.update(offset=t["offset"] + 2), "not aligned"),
    (lambda t: t.pop("length"), "malformed"),
])
def test_weights_index_errors(fake_bundle, change, words):
    root, _ = fake_bundle
    path = root / "lm" / "lm.weights.json"
    index = json.loads(path.read_text())
    change(index["tensors"][0])
    path.write_text(json.dumps(index))
    assert words in bundle_error(root)


def test_shapes_that_disagree_with_the_graphs(fake_bundle):
    root, _ = fake_bundle
    shapes = json.loads((root / "manifest.json").read_text())["shapes"]
    set_manifest(root, shapes=shapes | {"cache_capacity": shapes["cache_capacity"] + 1,
                                        "prefill_slots": shapes["prefill_slots"]})
    msg = bundle_error(root)
    assert "decode graph input 'cache_valid' has shape" in msg


def test_missing_graph_file(fake_bundle):
    root, _ = fake_bundle
    (root / "lm" / "decode.onnx").unlink()
    assert "lm/decode.onnx is missing" in bundle_error(root)  # the manifest's file list catches it first


def test_corrupt_graph_file(fake_bundle):
    root, _ = fake_bundle
    (root / "lm" / "decode.onnx").write_bytes(b"\x08\x07garbage")
    assert "cannot load decode graph" in bundle_error(root)


def test_threads_from_the_environment(fake_bundle, monkeypatch):
    root, _ = fake_bundle
    monkeypatch.setenv("EDGEPRUNE_THREADS", "1")
    eng = engine(root)
    assert eng.decode.get_session_options().intra_op_num_threads == 1
    monkeypatch.setenv("EDGEPRUNE_THREADS", "many")
    assert "EDGEPRUNE_THREADS" in bundle_error(root, Status.INVALID_ARGUMENT)


def prepacking(session) -> bool:
    try:
        return session.get_session_options().get_session_config_entry("session.disable_prepacking") != "1"
    except RuntimeError:  # the key was never set: ORT's default, prepacking on
        return True


def test_prepacking_is_off_for_the_lm_unless_asked(fake_bundle, monkeypatch):
    root, _ = fake_bundle
    monkeypatch.delenv("EDGEPRUNE_LM_PREPACK", raising=False)
    eng = engine(root)
    assert (prepacking(eng.vision), prepacking(eng.prefill), prepacking(eng.decode)) == (True, False, False)
    monkeypatch.setenv("EDGEPRUNE_LM_PREPACK", "1")
    eng = engine(root)
    assert (prepacking(eng.prefill), prepacking(eng.decode)) == (True, False)


def test_cpu_arena_from_the_environment(fake_bundle, monkeypatch):
    """Unset (or 0): no ONNX Runtime CPU arena in any session (ORT's own default is on); EDGEPRUNE_CPU_ARENA=1 brings
    it back in every session."""
    root, _ = fake_bundle
    import onnxruntime as ort

    assert ort.SessionOptions().enable_cpu_mem_arena  # ORT's default, which the runtime overrides
    for value in (None, "0"):
        if value is None:
            monkeypatch.delenv("EDGEPRUNE_CPU_ARENA", raising=False)
        else:
            monkeypatch.setenv("EDGEPRUNE_CPU_ARENA", value)
        eng = engine(root)
        assert not any(s.get_session_options().enable_cpu_mem_arena for s in (eng.vision, eng.prefill, eng.decode))
    monkeypatch.setenv("EDGEPRUNE_CPU_ARENA", "1")
    eng = engine(root)
    assert all(s.get_session_options().enable_cpu_mem_arena for s in (eng.vision, eng.prefill, eng.decode))
    monkeypatch.setenv("EDGEPRUNE_CPU_ARENA", "maybe")
    assert "EDGEPRUNE_CPU_ARENA" in bundle_error(root, Status.INVALID_ARGUMENT)
