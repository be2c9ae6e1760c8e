"""The Pythonic wrapper: statuses become RuntimeStatusError, results and streaming."""

import json

import pytest
from PIL import Image

from edgeprune_runtime import Bundle, Result, RuntimeStatusError, Status, capi
from fake_bundle import set_manifest

PROMPT = "What is in the picture?"


def test_generate(fake_bundle, images):
    root, _ = fake_bundle
    start = capi.live_handles()
    pieces = []
    with Bundle(root) as bundle:
        result = bundle.generate(images["wide"], PROMPT, max_new_tokens=6, on_text=pieces.append)
        again = bundle.generate(str(images["wide"]), PROMPT, max_new_tokens=6)
        assert bundle.shapes.cache_capacity > result.cache_slots_used
    assert isinstance(result, Result)
    assert result.token_ids == again.token_ids and len(result.token_ids) <= 6
    assert result.stop_reason in ("max_new_tokens", "eos")
    assert "".join(pieces) == result.text
    assert result.visual_tokens > 0 and result.prompt_tokens > 5
    assert result.ttft_s > 0
    d = result.to_dict()
    json.dumps(d)
    assert {"token_ids", "text", "visual_tokens", "ttft_s", "decode_tokens_per_s", "stop_reason"} <= set(d)
    assert capi.live_handles() == start  # every handle released


def test_generate_from_a_pil_image(fake_bundle, images):
    root, _ = fake_bundle
    with Bundle(root) as bundle, Image.open(images["tall"]) as img:
        assert bundle.generate(img, PROMPT, max_new_tokens=3).token_ids == \
            bundle.generate(images["tall"], PROMPT, max_new_tokens=3).token_ids


def test_step_by_step_generator(fake_bundle, images):
    root, _ = fake_bundle
    tok = json.loads((root / "manifest.json").read_text())["tokenizer"]
    set_manifest(root, tokenizer=tok | {"eos_token_ids": [3]})
    with Bundle(root) as bundle:
        with bundle.generator(images["square"], PROMPT, max_new_tokens=0) as gen:
            tokens = list(gen)
            assert gen.stop_reason == "cache_full"
            assert gen.cache_length == bundle.shapes.cache_capacity
            assert tuple(tokens) == gen.token_ids
        with pytest.raises(RuntimeStatusError) as e:
            gen.done
        assert e.value.status == Status.INVALID_ARGUMENT and "closed" in e.value.message


def test_errors_become_exceptions(fake_bundle, images, tmp_path):
    root, _ = fake_bundle
    with pytest.raises(RuntimeStatusError) as e:
        Bundle(tmp_path / "nothing")
    assert e.value.status == Status.BUNDLE_INVALID
    with Bundle(root) as bundle:
        with pytest.raises(RuntimeStatusError) as e:
            bundle.generate(tmp_path / "nothing.png", PROMPT)
        assert e.value.status == Status.IMAGE_INVALID
        with pytest.raises(RuntimeStatusError) as e:
            bundle.generate(images["wide"], PROMPT, max_new_tokens=10_000)
        assert e.value.status == Status.INVALID_ARGUMENT and "--max-new-tokens 10000 needs" in e.value.message
        with pytest.raises(RuntimeStatusError) as e:
            bundle.generate(images["wide"], PROMPT, top_p=2.0)
        assert e.value.status == Status.INVALID_ARGUMENT
    with pytest.raises(RuntimeStatusError) as e:
        bundle.shapes
    assert "closed" in e.value.message


def test_tampered_bundle_is_refused(fake_bundle):
    root, _ = fake_bundle
    with open(root / "lm" / "lm.weights", "r+b") as f:
        f.seek(100)
        f.write(b"\x01")
    with pytest.raises(RuntimeStatusError) as e:
        Bundle(root)
    assert e.value.status == Status.BUNDLE_INVALID and "lm/lm.weights" in e.value.message
    Bundle(root, verify_hashes=False).close()
