"""Prompt encoding around the image token, slot limits and incremental detokenization."""

import pytest

from edgeprune_runtime.errors import RuntimeStatusError, Status
from edgeprune_runtime.tokenize import PromptTokenizer, apply_template
from fake_bundle import TEMPLATE, train_tokenizer


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer().save(str(path))
    return path


def make(path, before=8, after=32) -> PromptTokenizer:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    return PromptTokenizer.from_file(path, "<image>", tok.token_to_id("<image>"), [tok.token_to_id("</s>")], before, after)


def error(fn, *args) -> RuntimeStatusError:
    with pytest.raises(RuntimeStatusError) as e:
        fn(*args)
    return e.value


def test_split_at_the_image_token(tokenizer_file):
    pt = make(tokenizer_file)
    text = apply_template(TEMPLATE, "What is in the picture?")
    before, after = pt.encode_prompt(text)
    full = pt.tokenizer.encode(text).ids
    assert full == before + [pt.image_token_id] + after
    assert before[0] == pt.tokenizer.token_to_id("<s>")  # BOS from the post-processor
    assert pt.image_token_id not in before + after
    assert pt.decode(before) == "USER: "
    assert pt.decode(after) == "\nWhat is in the picture? ASSISTANT:"


def test_template_uses_replace_not_format():
    assert apply_template("A {x} <image> {prompt}!", "use {braces} {prompt}") == "A {x} <image> use {braces} {prompt}!"


def test_prompt_too_long_after_image(tokenizer_file):
    pt = make(tokenizer_file, after=4)
    text = apply_template(TEMPLATE, "What is in the picture?")
    ids = pt.tokenizer.encode(text).ids
    n_after = len(ids) - ids.index(pt.image_token_id) - 1
    e = error(pt.encode_prompt, text)
    assert e.status == Status.PROMPT_TOO_LONG
    assert e.message.startswith(f"prompt needs {n_after} text slots after the image, the bundle has 4;")
    assert "`shapes.text_slots_after_image`" in e.message and "re-export" in e.message


def test_prompt_too_long_before_image(tokenizer_file):
    pt = make(tokenizer_file, before=2)
    e = error(pt.encode_prompt, "USER: What is in the picture? <image> ASSISTANT:")
    assert e.status == Status.PROMPT_TOO_LONG
    assert "before the image, the bundle has 2" in e.message and "`shapes.text_slots_before_image`" in e.message


def test_slots_exactly_full_is_fine(tokenizer_file):
    pt = make(tokenizer_file)
    text = apply_template(TEMPLATE, "What is in the picture?")
    before, after = pt.encode_prompt(text)
    exact = make(tokenizer_file, before=len(before), after=len(after))
    assert exact.encode_prompt(text) == (before, after)


@pytest.mark.parametrize("prompt", ["no image here", "<image> and <image>"])
def test_raw_prompt_needs_exactly_one_image(tokenizer_file, prompt):
    e = error(make(tokenizer_file).prompt_text, prompt, TEMPLATE, True)
    assert e.status == Status.INVALID_ARGUMENT
    assert "exactly once" in e.message and "\n" not in e.message


def test_templated_prompt_must_not_contain_the_image_token(tokenizer_file):
    e = error(make(tokenizer_file).prompt_text, "what is <image>?", TEMPLATE, False)
    assert e.status == Status.INVALID_ARGUMENT and "--raw-prompt" in e.message


def test_raw_prompt_is_used_verbatim(tokenizer_file):
    pt = make(tokenizer_file)
    assert pt.prompt_text("<image>\ncaption:", TEMPLATE, True) == "<image>\ncaption:"
    assert pt.prompt_text("hi", TEMPLATE, False) == "USER: <image>\nhi ASSISTANT:"


def test_image_token_id_must_match_the_manifest(tokenizer_file):
    e = error(PromptTokenizer.from_file, tokenizer_file, "<image>", 3, [2], 8, 8)
    assert e.status == Status.BUNDLE_INVALID and "<image>" in e.message


def test_unreadable_tokenizer(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    assert error(PromptTokenizer.from_file, bad, "<image>", 4, [2], 8, 8).status == Status.BUNDLE_INVALID


def test_decode_skips_special_tokens(tokenizer_file):
    pt = make(tokenizer_file)
    ids = pt.tokenizer.encode("a red cup").ids
    assert ids[0] == pt.tokenizer.token_to_id("<s>")
    assert pt.decode(ids + [pt.tokenizer.token_to_id("</s>")]) == "a red cup"


@pytest.mark.parametrize("text", ["A cat sits on the table.", "café ☕ naïve 東京", "  spaces  and\nnewlines"])
def test_stream_increments_add_up_to_the_decoded_text(tokenizer_file, text):
    pt = make(tokenizer_file)
    ids = pt.tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids) > 3
    stream = pt.stream()
    pieces = [stream.put(i) for i in ids]
    assert "".join(pieces) == pt.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)  # split multi-byte characters are held back, not garbled


def test_stream_flush_returns_what_was_held_back(tokenizer_file):
    pt = make(tokenizer_file)
    ids = pt.tokenizer.encode("東", add_special_tokens=False).ids
    assert len(ids) >= 2  # a 3-byte character split over byte tokens
    stream = pt.stream()
    assert stream.put(ids[0]) == ""  # incomplete: held back
    assert stream.flush() == pt.decode(ids[:1]) and "\ufffd" in stream.text
    assert stream.flush() == ""
