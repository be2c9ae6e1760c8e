"""Vision -> prefill -> decode over the fixed cache, checked against the fake bundle's numpy twin.

The fake LM's logits depend on every valid cache slot, on the order of the slots and on each token's
position (tests/runtime/fake_bundle.py), so tokens equal to the twin's mean the runtime fed, compacted,
ordered and appended correctly. The expected tokens are computed without the runtime: transformers'
image processor makes the pixels, transformers' `pack_image_features` says which patches are real
(tests/hf_packing.py), the `tokenizers` library encodes the prompt, and the numpy twin generates.
"""

import json

import numpy as np
import pytest
from PIL import Image

from edgeprune_runtime.errors import RuntimeStatusError, Status
from edgeprune_runtime.generator import Generator, GeneratorParams, LoadedBundle
from edgeprune_runtime.preprocess import load_image
from fake_bundle import PATCH, TEMPLATE, make_fake_bundle, reference_tokens, set_manifest
from hf_packing import packed_order

PROMPT = "What is in the picture?"


def no_eos(root):
    """Points eos at <pad>, which the fake LM never picks (its head column is zero), so runs go to their limit."""
    tok = json.loads((root / "manifest.json").read_text())["tokenizer"]
    set_manifest(root, tokenizer=tok | {"eos_token_ids": [3]})


def reference(root, lm, image_path, count, eos=()):
    """(tokens the twin produces, the valid prefill sequence [n, D] in position order), without the runtime."""
    from tokenizers import Tokenizer
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    m = json.loads((root / "manifest.json").read_text())
    s, pp = m["shapes"], m["preprocess"]
    image = Image.open(image_path).convert("RGB")
    processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": pp["shortest_edge"]}, crop_size={"height": pp["crop_size"], "width": pp["crop_size"]},
        image_grid_pinpoints=pp["image_grid_pinpoints"], image_mean=pp["image_mean"], image_std=pp["image_std"],
        rescale_factor=pp["rescale_factor"], resample=pp["resample"])
    real = processor(images=image, return_tensors="np")["pixel_values"][0]  # [n, 3, crop, crop]
    pixels = np.zeros((s["partitions"],) + real.shape[1:], np.float32)
    pixels[: len(real)] = real
    embeds = lm.vis_table + pixels.mean(dtype=np.float32)  # the fake vision graph, [V, D]

    n = s["patches_per_partition"]
    order = packed_order((image.height, image.width), pp["image_grid_pinpoints"], pp["crop_size"], PATCH)
    patch_valid = np.zeros(s["partitions"] * n, np.float32)
    for item in order:
        if item[0] == "patch":
            patch_valid[item[1] * n + item[2]] = 1.0
    rows = sum(1 for item in order if item[0] == "newline")
    newline_valid = (np.arange(s["newline_slots"]) < rows).astype(np.float32)
    visual_valid = np.concatenate([patch_valid[: s["visual_topk"]], newline_valid])  # the fake vision's valid flags

    tok = Tokenizer.from_file(str(root / m["tokenizer"]["file"]))
    ids = tok.encode(TEMPLATE.replace("{prompt}", PROMPT)).ids
    cut = ids.index(m["tokenizer"]["image_token_id"])
    seq = np.concatenate([lm.embed[ids[:cut]], embeds[visual_valid > 0.5], lm.embed[ids[cut + 1:]]]).astype(np.float32)
    return reference_tokens(lm, seq, count, eos), seq


@pytest.mark.parametrize("image", ["wide", "tall", "square"])
def test_greedy_tokens_match_the_twin(fake_bundle, images, image):
    root, lm = fake_bundle
    no_eos(root)
    bundle = LoadedBundle(root)
    gen = Generator(bundle, GeneratorParams(max_new_tokens=10), images[image], PROMPT)
    tokens = [gen.generate_next_token() for _ in range(10)]
    expected, seq = reference(root, lm, images[image], 10)
    assert tokens == expected
    assert len(set(tokens)) > 3  # the twin is not degenerate: a wrong slot would show
    assert gen.stop_reason == "max_new_tokens"
    assert gen.cache.length == len(seq) + 9  # the last token's K/V is never needed


def test_cache_holds_compacted_prefill_and_appended_tokens(fake_bundle, images):
    root, lm = fake_bundle
    no_eos(root)
    bundle = LoadedBundle(root)
    gen = Generator(bundle, GeneratorParams(max_new_tokens=5), images["wide"], PROMPT)
    _, seq = reference(root, lm, images["wide"], 0)
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
    for valid in gen.cache.valid:
        np.testing.assert_array_equal(valid, (np.arange(bundle.shapes.cache_capacity) < n + 4).astype(np.float32))


def test_bundle_without_newline_inputs(tmp_path, images):
    root, lm = make_fake_bundle(tmp_path / "b", newlines=False)
    no_eos(root)
    bundle = LoadedBundle(root)
    assert "newline_valid" not in bundle.engine.vision_inputs
    gen = Generator(bundle, GeneratorParams(max_new_tokens=6), images["tall"], PROMPT)
    assert [gen.generate_next_token() for _ in range(6)] == reference(root, lm, images["tall"], 6)[0]


def test_stop_on_eos(fake_bundle, images):
    root, lm = fake_bundle
    no_eos(root)
    expected = reference(root, lm, images["square"], 8)[0]
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
    assert gen.token_ids == reference(root, lm, images["wide"], c - n + 1)[0]
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


def test_the_fake_lm_notices_a_swapped_cache_slot_or_a_shifted_position(fake_bundle, images):
    """The fake is only worth its tokens if a runtime bug would change them: swapping two cached tokens (same
    contents, other slots) or starting decode one position late must change the continuation."""
    root, lm = fake_bundle
    no_eos(root)
    bundle = LoadedBundle(root)
    expected, seq = reference(root, lm, images["wide"], 8)

    swapped = Generator(bundle, GeneratorParams(max_new_tokens=8), images["wide"], PROMPT)
    for buf in swapped.cache.keys + swapped.cache.values:
        buf[:, [3, 4]] = buf[:, [4, 3]]
    assert [swapped.generate_next_token() for _ in range(8)][1:] != expected[1:]

    shifted = Generator(bundle, GeneratorParams(max_new_tokens=8), images["wide"], PROMPT)
    shifted.cache.position += 1  # a hole: every later token sits one slot (= one position) late
    shifted.cache.lengths = [n + 1 for n in shifted.cache.lengths]
    assert [shifted.generate_next_token() for _ in range(8)][1:] != expected[1:]

    # and the twin itself: the same tokens in another order are another prompt
    assert reference_tokens(lm, seq[::-1], 8) != expected and reference_tokens(lm, seq[1:], 8) != expected
