"""Multi-turn on the tiny twin: a follow-up appended to the cache gives the tokens of one request whose prompt is
the whole conversation, without running the vision graph again.

The reference request is built apart from the follow-up path: the whole conversation's ids go through the
*prefill* graph in one go (vision once, then prefill, then greedy decode steps), while a follow-up appends to
the cache with the step graph. The conversation's text format is checked against transformers' own
`apply_chat_template` of the twin's processor.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgeprune_runtime import Bundle, RuntimeStatusError, Status
from edgeprune_runtime.generator import Generator, GeneratorParams, LoadedBundle, follow_up_template
from edgeprune_runtime.layout import layout_for
from edgeprune_runtime.preprocess import load_image, preprocess
from edgeprune_runtime.tokenize import text_slots
from tiny_inputs import random_image


@pytest.fixture(scope="module")
def long_bundle(tmp_path_factory, tiny):
    """The tiny twin with 64 text slots after the image, so a three-turn conversation fits one prefill."""
    from pathlib import Path

    from edgeprune.export import export_bundle
    from edgeprune.recipe import load_recipe

    root = tmp_path_factory.mktemp("long")
    recipe = root / "recipe.toml"
    text = (Path(__file__).resolve().parents[1] / "edgeprune" / "recipes" / "llava-next-tiny.toml").read_text()
    assert "text_slots_after_image = 32" in text
    recipe.write_text(text.replace("text_slots_after_image = 32", "text_slots_after_image = 64"))
    return export_bundle("llava-next-tiny", root / "bundle", load_recipe(recipe), loaded=tiny)


@pytest.fixture(scope="module")
def loaded(long_bundle):
    return LoadedBundle(long_bundle)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "cam.png"
    random_image((60, 200), 5).save(path)
    return path


def single_request(bundle: LoadedBundle, image, before: list[int], after: list[int], n: int) -> list[int]:
    """Greedy tokens of one request given as ids around the image: vision, one prefill, decode steps."""
    s, engine = bundle.shapes, bundle.engine
    pv, hw = preprocess(load_image(image), bundle.preprocess_params)
    embeds, valid, _ = engine.run_vision(pv, layout_for(hw, bundle.preprocess_params.image_grid_pinpoints, s).feeds())
    ids, text_valid = text_slots(before, after, s.text_slots_before_image, s.text_slots_after_image)
    logits, keys, values, layer_valid = engine.run_prefill(ids, text_valid, embeds, valid)
    cache = engine.new_cache()
    cache.fill_from_prefill(keys, values, layer_valid)
    decoder = engine.decoder(cache)
    out = [int(np.argmax(logits))]
    while len(out) < n:
        out.append(int(np.argmax(decoder.step(out[-1]))))
    return out


def run(gen: Generator) -> Generator:
    while not gen.done:
        gen.generate_next_token()
    return gen


def conversation_ids(bundle, turns: list[Generator]) -> tuple[list[int], list[int]]:
    """(ids before the image, ids after it) of the conversation the last turn answers."""
    ids = turns[-1].prompt_token_ids
    cut = ids.index(bundle.tokenizer.image_token_id)
    return ids[:cut], ids[cut + 1:]


def test_follow_up_equals_the_whole_conversation_as_one_request(loaded, image, monkeypatch):
    first = run(Generator(loaded, GeneratorParams(max_new_tokens=3), image, "What is on the table?"))
    calls = []
    monkeypatch.setattr(loaded.engine, "run_vision", lambda *a: calls.append(a))  # a follow-up must not run it
    monkeypatch.setattr(loaded.engine, "run_prefill", lambda *a: calls.append(a))
    second = run(first.follow_up("What color?", GeneratorParams(max_new_tokens=3)))
    third = run(second.follow_up("Is it big?", GeneratorParams(max_new_tokens=3)))
    assert calls == [] and second.timings.vision_s == 0.0 and second.timings.image_s == 0.0
    monkeypatch.undo()
    tok = loaded.tokenizer.tokenizer
    # what the cache holds after turn 1: the prompt, all 3 answer tokens (none was EOS), the follow-up's text
    expected_ids = first.prompt_token_ids + first.token_ids + tok.encode(" USER: What color? ASSISTANT:",
                                                                         add_special_tokens=False).ids
    assert second.prompt_token_ids == expected_ids
    assert first.stop_reason == "max_new_tokens"
    for turn, n in ((second, 3), (third, 3)):
        before, after = conversation_ids(loaded, [turn])
        assert turn.token_ids == single_request(loaded, image, before, after, n)
    before, after = conversation_ids(loaded, [third])  # one cache, shared by the turns: the latest fills it
    assert third.cache.length == len(before) + first.visual_tokens + len(after) + 3 - 1


def test_an_answer_ending_in_eos_leaves_eos_out(long_bundle, image):
    """The chat template writes no EOS after an answer, so neither does the cache."""
    bundle = LoadedBundle(long_bundle)
    probe = run(Generator(bundle, GeneratorParams(max_new_tokens=3), image, "Is there a dog?"))
    bundle.tokenizer = dataclasses.replace(bundle.tokenizer, eos_token_ids=(probe.token_ids[1],))
    first = run(Generator(bundle, GeneratorParams(max_new_tokens=3), image, "Is there a dog?"))
    assert first.stop_reason == "eos" and first.token_ids[-1] == probe.token_ids[1]
    second = run(first.follow_up("Where?", GeneratorParams(max_new_tokens=4)))
    follow = bundle.tokenizer.tokenizer.encode(" USER: Where? ASSISTANT:", add_special_tokens=False).ids
    assert second.prompt_token_ids == first.prompt_token_ids + first.token_ids[:-1] + follow
    before, after = conversation_ids(bundle, [second])
    assert second.token_ids == single_request(bundle, image, before, after, len(second.token_ids))


def test_follow_up_template_matches_transformers(tiny):
    """prompt + " " + answer + follow-up text == the processor's chat template of the whole conversation."""
    from edgeprune.export import _prompt_template

    template = _prompt_template(tiny.processor)
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is on the table?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red cup."}]},
        {"role": "user", "content": [{"type": "text", "text": "What color is it?"}]},
    ]
    hf = tiny.processor.apply_chat_template(conversation, add_generation_prompt=True)
    ours = (template.replace("{prompt}", "What is on the table?") + " A red cup."
            + follow_up_template(template, "<image>").replace("{prompt}", "What color is it?"))
    assert ours == hf


def test_follow_up_misuse(loaded, image):
    first = Generator(loaded, GeneratorParams(max_new_tokens=2), image, "What is on the table?")
    with pytest.raises(RuntimeStatusError) as e:
        first.follow_up("And?", GeneratorParams())
    assert e.value.status == Status.INVALID_ARGUMENT and "finish this turn" in e.value.message
    run(first)
    with pytest.raises(RuntimeStatusError) as e:
        first.follow_up("Look at <image>", GeneratorParams())
    assert e.value.status == Status.INVALID_ARGUMENT and "new conversation" in e.value.message
    with pytest.raises(RuntimeStatusError) as e:
        first.follow_up("And?", GeneratorParams(max_new_tokens=10_000))
    assert e.value.status == Status.CACHE_FULL
    second = first.follow_up("And?", GeneratorParams(max_new_tokens=2))
    for call in (lambda: first.follow_up("Again?", GeneratorParams()), first.generate_next_token):
        with pytest.raises(RuntimeStatusError) as e:
            call()
        assert e.value.status == Status.INVALID_ARGUMENT
    run(second)


def test_chat_api(tiny_bundles, image):
    with Bundle(tiny_bundles[0.2]) as bundle:
        chat = bundle.chat(image)
        a = chat.ask("What is on the table?", max_new_tokens=3)
        b = chat.ask("What color is it?", max_new_tokens=3)
        assert b.timings["vision_s"] == 0.0 and a.timings["vision_s"] > 0.0
        assert len(chat.turns) == 2
        again = bundle.chat(image)
        assert again.ask("What is on the table?", max_new_tokens=3).token_ids == a.token_ids
        assert again.ask("What color is it?", max_new_tokens=3).token_ids == b.token_ids
        chat.close()
        again.close()


def _cli(args, stdin=""):
    import subprocess
    import sys
    from pathlib import Path

    edgeprune = [str(Path(sys.executable).parent / "edgeprune"), "run"]
    runtime = [sys.executable, "-m", "edgeprune_runtime"]
    return [subprocess.run(cmd + [str(a) for a in args], input=stdin, capture_output=True, text=True, timeout=300)
            for cmd in (edgeprune, runtime)]


def test_turns_file_and_interactive(tiny_bundles, image, tmp_path):
    import json

    turns = tmp_path / "turns.jsonl"
    turns.write_text('{"prompt": "What color is it?"}\n\n{"prompt": "Is it big?"}\n')
    base = [tiny_bundles[0.2], "--image", image, "--prompt", "What is on the table?", "--max-new-tokens", 3]
    with Bundle(tiny_bundles[0.2]) as bundle, bundle.chat(image) as chat:
        expected = [chat.ask(q, max_new_tokens=3).token_ids for q in ("What is on the table?", "What color is it?",
                                                                        "Is it big?")]
    for result in _cli(base + ["--turns", turns, "--json"]) + _cli(base + ["--interactive", "--json"],
                                                                      stdin="What color is it?\n\nIs it big?\n"):
        assert result.returncode == 0, result.stderr
        answers = [json.loads(line) for line in result.stdout.splitlines()]
        assert [tuple(a["token_ids"]) for a in answers] == expected
        assert answers[1]["timings"]["vision_s"] == 0.0


@pytest.mark.parametrize("content,message", [
    ("What color is it?\n", "line 1 is not JSON"),
    ('{"prompt": "ok"}\n{"question": "x"}\n', 'line 2 must be an object with one string key "prompt"'),
    ('{"prompt": 3}\n', 'line 1 must be an object'),
    ('{"prompt": "ok"}\n' + "[" * 100_000 + "\n", "line 2 is not JSON"),  # nesting past the parser's recursion limit
])
def test_a_turns_file_that_is_not_jsonl_is_one_error_line(tiny_bundles, image, tmp_path, content, message):
    turns = tmp_path / "turns.jsonl"
    turns.write_text(content)
    for result in _cli([tiny_bundles[0.2], "--image", image, "--prompt", "Hi", "--turns", turns]):
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
        assert result.stdout == ""  # refused before any answer


def test_follow_up_after_an_exact_boundary_turn(loaded, image):
    """The first turn finished its last word byte by byte; the cache holds that word's canonical tokens, and the
    follow-up's conversation ids say so."""
    first = run(Generator(loaded, GeneratorParams(max_new_tokens=2, exact_boundary=True), image,
                          "USER: <image>\nThe cat sits on the ta", raw_prompt=True))
    second = run(first.follow_up("What color?", GeneratorParams(max_new_tokens=3)))
    tok = loaded.tokenizer.tokenizer
    word = tok.encode(" ta" + first.boundary_text, add_special_tokens=False).ids
    assert second.prompt_token_ids[:len(first.prompt_token_ids) - 2] == first.prompt_token_ids[:-2]  # " ta" is 2 ids
    assert word == second.prompt_token_ids[len(first.prompt_token_ids) - 2:][:len(word)]
    before, after = conversation_ids(loaded, [second])
    assert second.token_ids == single_request(loaded, image, before, after, 3)


def test_a_new_image_reuses_the_buffers(tiny_bundles, image, tmp_path):
    """Chat.new_image: the next question runs vision and prefill on the same cache arrays, with the tokens of a
    fresh conversation about that image."""
    other = tmp_path / "other.png"
    random_image((100, 100), 9).save(other)
    with Bundle(tiny_bundles[0.2]) as bundle:
        with bundle.chat(other) as fresh:
            expected = [fresh.ask(q, max_new_tokens=4).token_ids for q in ("What is here?", "And?")]
        with bundle.chat(image) as chat:
            chat.ask("What is on the table?", max_new_tokens=6)
            from edgeprune_runtime import capi

            cache = capi._objects[chat._gen._handle].cache
            keys = cache.keys[0]
            chat.new_image(other)
            got = [chat.ask(q, max_new_tokens=4) for q in ("What is here?", "And?")]
            assert capi._objects[chat._gen._handle].cache.keys[0] is keys  # the same buffer, not a new one
    assert [r.token_ids for r in got] == expected
    assert got[0].timings["vision_s"] > 0 and got[1].timings["vision_s"] == 0


@pytest.fixture(scope="module")
def per_layer_bundle(tmp_path_factory, tiny, tiny_recipe):
    """The tiny twin with per-layer caches: 12 visual slots go on after layer 0 (FastV), and from decode position 1
    on layer 0 is skipped (SkipDecode), so the two layers hold different tokens."""
    from edgeprune.export import export_bundle

    recipe = tiny_recipe(0.2).override(drop_visual_after="0:12", skip_decode="1:1")
    return export_bundle("llava-next-tiny", tmp_path_factory.mktemp("per-layer") / "bundle", recipe, loaded=tiny)


def test_follow_up_on_per_layer_caches(per_layer_bundle, image):
    """Each layer's cache holds what the schedules say, counted by hand: layer 0 every prompt token, the first
    answer token's K/V (decode position 0 runs every layer, position 1 on skips layer 0), the follow-up's slots
    (the step graph runs every layer) and nothing of the second answer; layer 1 the text, 12 of the visual
    tokens and every token."""
    bundle = LoadedBundle(per_layer_bundle)
    assert bundle.shapes.layer_visual_slots == (bundle.shapes.visual_slots, 12)
    first = run(Generator(bundle, GeneratorParams(max_new_tokens=3, ignore_eos=True), image, "What is on the table?"))
    text, visual = len(first.prompt_token_ids) - 1, first.visual_tokens
    assert visual > 12
    second = run(first.follow_up("What color?", GeneratorParams(max_new_tokens=3, ignore_eos=True)))
    follow = len(bundle.tokenizer.tokenizer.encode(" USER: What color? ASSISTANT:", add_special_tokens=False).ids)
    new = 1 + follow  # the first answer's last token (sampled, never run) and the follow-up's text
    assert second.cache.lengths == [text + visual + 1 + new, text + 12 + 2 + new + 2]
    assert second.cache.position == text + visual + 2 + new + 2  # positions count every token, in every layer
    assert len(second.token_ids) == 3 and np.isfinite(second.logits).all()


def test_a_one_token_step_equals_a_decode_step_on_per_layer_caches(per_layer_bundle, image):
    """StepRunner.run of one token over the per-layer cache gives the decode graph's logits and K/V (decode
    position 0: every layer runs)."""
    from edgeprune_runtime.step import step_runner

    bundle = LoadedBundle(per_layer_bundle)
    gen = Generator(bundle, GeneratorParams(max_new_tokens=3), image, "What is on the table?")
    token = int(np.argmax(gen.logits))
    logits, keys, values = step_runner(bundle).run([token], gen.cache)  # reads the cache, writes nothing
    lengths = list(gen.cache.lengths)
    decoded = gen.decoder.step(token).copy()
    np.testing.assert_allclose(logits, decoded, atol=1e-4, rtol=0)
    for layer in range(bundle.shapes.num_layers):
        slot = lengths[layer]  # where the decode step wrote this token's K/V
        np.testing.assert_allclose(keys[layer][:, 0], gen.cache.keys[layer][:, slot], atol=1e-5, rtol=0)
        np.testing.assert_allclose(values[layer][:, 0], gen.cache.values[layer][:, slot], atol=1e-5, rtol=0)


def test_exact_boundary_on_per_layer_caches(per_layer_bundle, image):
    bundle = LoadedBundle(per_layer_bundle)
    gen = Generator(bundle, GeneratorParams(max_new_tokens=3, exact_boundary=True, ignore_eos=True), image,
                    "USER: <image>\nThe cat sits on the ta", raw_prompt=True)
    for c in (b"", b"b"):
        assert abs(gen.next_byte_probs(c).sum() - 1.0) < 1e-9
    run(gen)
    assert len(gen.token_ids) == 3 and gen.boundary_text
    # both layers got the finished word's tokens; layer 1 holds 12 visual tokens, and the second answer token
    # (decode position 1) that layer 0 skipped
    assert gen.cache.lengths[1] - gen.cache.lengths[0] == 12 - gen.visual_tokens + 1


def test_raw_prompt_takes_the_same_values_in_both_turns(tiny_bundles, image):
    """Generator_Create and Generator_CreateFollowUp accept a numpy bool for raw_prompt alike, and refuse a str alike."""
    from edgeprune_runtime import capi
    from edgeprune_runtime.capi import Out

    out = Out()
    assert capi.Bundle_Create(str(tiny_bundles[0.2]), out) == Status.OK
    bundle = out.value
    capi.GeneratorParams_Create(out)
    params = out.value
    capi.GeneratorParams_SetMaxNewTokens(params, 2)

    def done_turn(raw):
        assert capi.Generator_Create(bundle, params, str(image), "What is it?", raw, out) == Status.OK
        gen = out.value
        while capi.Generator_IsDone(gen, out) == Status.OK and not out.value:
            assert capi.Generator_GenerateNextToken(gen) == Status.OK
        return gen

    first, second = done_turn(np.False_), done_turn(False)
    assert capi.Generator_CreateFollowUp(first, params, "And?", np.False_, out) == Status.OK
    follow = out.value
    assert capi.Generator_Create(bundle, params, str(image), "What is it?", "no", out) == Status.INVALID_ARGUMENT
    assert "raw_prompt must be a bool" in capi.GetLastError()
    assert capi.Generator_CreateFollowUp(second, params, "And?", "no", out) == Status.INVALID_ARGUMENT
    assert "raw_prompt must be a bool" in capi.GetLastError()
    for handle in (first, second, follow):
        assert capi.Generator_Destroy(handle) == Status.OK
    capi.GeneratorParams_Destroy(params)
    capi.Bundle_Destroy(bundle)


def test_a_handed_over_turn_keeps_its_logits(loaded, image):
    """The first turn's logits (the decoder's buffer after a decode step) stay what they were while the follow-up,
    which steps the same decoder, generates."""
    first = run(Generator(loaded, GeneratorParams(max_new_tokens=3, ignore_eos=True), image, "What is on the table?"))
    kept = first.logits.copy()
    run(first.follow_up("What color?", GeneratorParams(max_new_tokens=3, ignore_eos=True)))
    np.testing.assert_array_equal(first.logits, kept)
