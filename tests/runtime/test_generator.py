"""Vision -> prefill -> decode over the fixed cache, checked against the fake bundle's numpy twin.

The fake LM's logits depend on every valid cache slot, each slot's position and the new token's
own K/V, so tokens equal to the twin's mean the runtime fed, compacted and appended correctly.
"""

import json

import numpy as np
import pytest

from edgeprune_runtime.errors import RuntimeStatusError, Status
from edgeprune_runtime.generator import Generator, GeneratorParams, LoadedBundle
from edgeprune_runtime.layout import compute_layout
from edgeprune_runtime.preprocess import load_image, preprocess
from fake_bundle import make_fake_bundle, prefill_sequence, reference_tokens, set_manifest

PROMPT = "What is in the picture?"


def no_eos(root):
    """Points eos at <pad>, which the fake LM never picks, so runs go to their limit."""
    tok = json.loads((root / "manifest.json").read_text())["tokenizer"]
    set_manifest(root, tokenizer=tok | {"eos_token_ids": [3]})


def reference(bundle: LoadedBundle, lm, image_path, count, eos=()):
    """(tokens the twin produces, the valid prefill sequence [n, D])."""
    s, pp = bundle.shapes, bundle.preprocess_params
    pixel_values, hw = preprocess(load_image(image_path), pp)
    layout = compute_layout(hw, pp.image_grid_pinpoints, s.crop_size, s.patch_grid, s.partitions, s.newline_slots)
    embeds, valid, _ = bundle.engine.run_vision(pixel_values, layout.feeds())
    before, after = bundle.tokenizer.encode_prompt(bundle.prompt_template.replace("{prompt}", PROMPT))
    seq = prefill_sequence(lm, None, before, after, embeds, valid)
    return reference_tokens(lm, seq, count, eos), seq


@pytest.mark.parametrize("image", ["wide", "tall", "square"])
def test_greedy_tokens_match_the_twin(fake_bundle, images, image):
    root, lm = fake_bundle
    no_eos(root)
    bundle = LoadedBundle(root)
    gen = Generator(bundle, GeneratorParams(max_new_tokens=10), images[image], PROMPT)
    tokens = [gen.generate_next_token() for _ in range(10)]
    expected, seq = reference(bundle, lm, images[image], 10)
    assert tokens == expected
    assert len(set(tokens)) > 3  # the twin is not degenerate: a wrong slot would show
    assert gen.stop_reason == "max_new_tokens"
    assert gen.cache.length == len(seq) + 9  # the last token's K/V is never needed


def test_cache_holds_compacted_prefill_and_appended_tokens(fake_bundle, images):
    root, lm = fake_bundle
    no_eos(root)
    bundle = LoadedBundle(root)
    gen = Generator(bundle, GeneratorParams(max_new_tokens=5), images["wide"], PROMPT)
    _, seq = reference(bundle, lm, images["wide"], 0)
    n = len(seq)
    assert gen.cache.length == gen.prompt_slots == n
    assert gen.visual_tokens < bundle.shapes.visual_slots  # some visual slots are padding, so compaction matters
    tokens = [gen.generate_next_token() for _ in range(5)]
    xs = np.concatenate([seq, lm.embed[tokens[:4]]])  # every token but the last has its K/V in the cache
    for layer, h in enumerate(bundle.shapes.kv_heads):
        k, v = lm.kv(xs, layer)
        assert gen.cache.keys[layer].shape == (h, bundle.shapes.cache_capacity, bundle.shapes.head_dim)
        np.testing.assert_allclose(gen.cache.keys[layer][:, :n + 4], k, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gen.cache.values[layer][:, :n + 4], v, rtol=1e-5, atol=1e-5)
        assert not gen.cache.keys[layer][:, n + 4:].any()
    np.testing.assert_array_equal(gen.cache.valid, (np.arange(bundle.shapes.cache_capacity) < n + 4).astype(np.float32))


def test_bundle_without_newline_inputs(tmp_path, images):
    root, lm = make_fake_bundle(tmp_path / "b", newlines=False)
    no_eos(root)
    bundle = LoadedBundle(root)
    assert "newline_valid" not in bundle.engine.vision_inputs
    gen = Generator(bundle, GeneratorParams(max_new_tokens=6), images["tall"], PROMPT)
    assert [gen.generate_next_token() for _ in range(6)] == reference(bundle, lm, images["tall"], 6)[0]


def test_stop_on_eos(fake_bundle, images):
    root, lm = fake_bundle
    no_eos(root)
    expected = reference(LoadedBundle(root), lm, images["square"], 8)[0]
    eos = expected[3]
    tok = json.loads((root / "manifest.json").read_text())["tokenizer"]
    set_manifest(root, tokenizer=tok | {"eos_token_ids": [3, eos]})
    gen = Generator(LoadedBundle(root), GeneratorParams(max_new_tokens=8), images["square"], PROMPT)
    while not gen.done:
        gen.generate_next_token()
    assert gen.token_ids == expected[: expected.index(eos) + 1]
    assert gen.stop_reason == "eos"
    with pytest.raises(RuntimeStatusError) as e:
        gen.generate_next_token()
    assert e.value.status == Status.INVALID_ARGUMENT and "eos" in e.value.message


def test_unlimited_generation_stops_at_a_full_cache(fake_bundle, images):
    root, lm = fake_bundle
    no_eos(root)
    bundle = LoadedBundle(root)
    gen = Generator(bundle, GeneratorParams(max_new_tokens=0), images["wide"], PROMPT)
    n, c = gen.prompt_slots, bundle.shapes.cache_capacity
    while not gen.done:
        gen.generate_next_token()
    assert gen.stop_reason == "cache_full"
    assert len(gen.token_ids) == c - n + 1  # the first token comes from prefill, each later one takes a slot
    assert gen.cache.length == c
    assert gen.token_ids == reference(bundle, lm, images["wide"], c - n + 1)[0]
    with pytest.raises(RuntimeStatusError) as e:
        gen.generate_next_token()
    assert e.value.status == Status.CACHE_FULL


def test_max_new_tokens_that_cannot_fit_fails_up_front(fake_bundle, images):
    root, _ = fake_bundle
    bundle = LoadedBundle(root)
    c = bundle.shapes.cache_capacity
    with pytest.raises(RuntimeStatusError) as e:
        Generator(bundle, GeneratorParams(max_new_tokens=500), images["wide"], PROMPT)
    assert e.value.status == Status.INVALID_ARGUMENT
    n = int(e.value.message.split(" needs ")[1].split()[0]) - 500
    assert e.value.message.startswith(f"--max-new-tokens 500 needs {n + 500} cache slots ({n} prompt + 500 new), "
                                      f"the bundle has {c}; lower it or raise `shapes.new_token_slots`")
    gen = Generator(bundle, GeneratorParams(max_new_tokens=c - n), images["wide"], PROMPT)  # exactly fits
    while not gen.done:
        gen.generate_next_token()
    assert gen.stop_reason == "max_new_tokens" and len(gen.token_ids) == c - n


def test_seeded_sampling(fake_bundle, images):
    root, _ = fake_bundle
    no_eos(root)
    bundle = LoadedBundle(root)

    def run(seed):
        gen = Generator(bundle, GeneratorParams(max_new_tokens=12, temperature=1.5, top_p=0.95, seed=seed),
                        images["wide"], PROMPT)
        return [gen.generate_next_token() for _ in range(12)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_pil_image_input_equals_path_input(fake_bundle, images):
    root, _ = fake_bundle
    bundle = LoadedBundle(root)
    a = Generator(bundle, GeneratorParams(max_new_tokens=4), images["tall"], PROMPT)
    b = Generator(bundle, GeneratorParams(max_new_tokens=4), load_image(images["tall"]), PROMPT)
    assert [a.generate_next_token() for _ in range(4)] == [b.generate_next_token() for _ in range(4)]


def test_bad_image(fake_bundle, tmp_path):
    root, _ = fake_bundle
    bundle = LoadedBundle(root)
    (tmp_path / "x.png").write_bytes(b"not a png")
    for image, status in ((tmp_path / "missing.png", Status.IMAGE_INVALID), (tmp_path / "x.png", Status.IMAGE_INVALID),
                          (42, Status.INVALID_ARGUMENT)):
        with pytest.raises(RuntimeStatusError) as e:
            Generator(bundle, GeneratorParams(), image, PROMPT)
        assert e.value.status == status


def test_timings(fake_bundle, images):
    root, _ = fake_bundle
    no_eos(root)
    gen = Generator(LoadedBundle(root), GeneratorParams(max_new_tokens=4), images["wide"], PROMPT)
    assert gen.timings.decode_tokens_per_s is None
    while not gen.done:
        gen.generate_next_token()
    t = gen.timings
    assert t.tokens == 4 and t.decode_s > 0 and t.decode_tokens_per_s == pytest.approx(3 / t.decode_s)
    assert t.ttft_s >= t.image_s + t.preprocess_s + t.vision_s + t.prefill_s
