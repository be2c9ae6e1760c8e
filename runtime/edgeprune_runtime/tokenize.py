"""Prompt -> token ids around the image, and generated ids -> text (also incrementally).

The bundle's `tokenizer.json` is loaded with `tokenizers` (no transformers). The prompt is
encoded as ONE string with special tokens (the tokenizer's post-processor adds BOS, exactly as
the Hugging Face processor does) and split at the single image token: the ids before it fill the
T1 text slots before the visual slots, the ids after it the T2 slots after them.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from pathlib import Path

from edgeprune_runtime import checks
from edgeprune_runtime.errors import RuntimeStatusError, Status

PROMPT_PLACEHOLDER = "{prompt}"
MAX_TOKENIZER_BYTES = 128 << 20  # the largest tokenizer.json files in use are ~35 MB
MAX_PROMPT_CHARS = 1 << 20  # far beyond any text-slot count; bounds the tokenizer's work
MAX_DECODE_IDS = 1 << 20
_NOT_OURS = (KeyboardInterrupt, SystemExit, GeneratorExit)  # never turned into a status


def _tokenizer_failed(what: str, e: BaseException) -> RuntimeStatusError:
    """A tokenizer that loaded but fails (or panics) on valid text is a broken bundle."""
    first = (str(e).splitlines() or [type(e).__name__])[0][:200]
    return RuntimeStatusError(Status.BUNDLE_INVALID, f"the bundle's tokenizer failed to {what} ({type(e).__name__}: {first}); re-export")


def token_id(value, vocab: int) -> int:
    """`value` as a token id: an integer (Python or numpy, not bool) in [0, vocab).

    Raises RuntimeStatusError(INVALID_ARGUMENT) otherwise."""
    if isinstance(value, bool):
        value = None
    try:
        i = operator.index(value)
    except TypeError:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"a token id must be an integer, got {checks.show(value)}") from None
    if not 0 <= i < vocab:
        raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"token id {i} is outside the vocabulary [0, {vocab})")
    return i


def text_slots(before: list[int], after: list[int], slots_before: int, slots_after: int):
    """The prefill graph's text inputs: ids i64 [T1+T2] and validity f32 [T1+T2].

    `before` fills the first T1 slots, `after` the T2 slots from T1 on; the rest is padding (id 0,
    masked out, so any in-vocabulary id would do). Lengths are checked by `encode_prompt`.
    """
    import numpy as np

    ids = np.zeros(slots_before + slots_after, np.int64)
    valid = np.zeros(slots_before + slots_after, np.float32)
    ids[:len(before)], valid[:len(before)] = before, 1.0
    ids[slots_before:slots_before + len(after)], valid[slots_before:slots_before + len(after)] = after, 1.0
    return ids, valid


def apply_template(template: str, user_text: str) -> str:
    """The bundle's chat template with the user's text in place of "{prompt}" (str.replace, not format:
    braces in the user's text stay as typed)."""
    return template.replace(PROMPT_PLACEHOLDER, user_text)


@dataclass
class PromptTokenizer:
    tokenizer: object  # tokenizers.Tokenizer
    image_token: str  # "<image>"
    image_token_id: int
    eos_token_ids: tuple[int, ...]
    slots_before: int  # T1
    slots_after: int  # T2
    vocab_size: int = 0  # ids in [0, vocab_size) may be decoded: the model's logits or the tokenizer's vocabulary

    @classmethod
    def from_file(cls, path: str | Path, image_token: str, image_token_id: int, eos_token_ids,
                  slots_before: int, slots_after: int, vocab_size: int = 0) -> "PromptTokenizer":
        """Loads `tokenizer.json` (a regular file of at most MAX_TOKENIZER_BYTES). Raises
        RuntimeStatusError(BUNDLE_INVALID) when the file cannot be parsed or its id for `image_token`
        differs from the manifest's `image_token_id`."""
        from tokenizers import Tokenizer

        size = checks.regular_file(Path(path), "tokenizer").st_size
        if size > MAX_TOKENIZER_BYTES:
            raise RuntimeStatusError(Status.BUNDLE_INVALID, f"tokenizer {path} has {size} bytes, over the "
                                     f"{MAX_TOKENIZER_BYTES} this runtime loads; re-export")
        try:
            tok = Tokenizer.from_file(str(path))
        except _NOT_OURS:
            raise
        except BaseException as e:  # a bare Exception for unparsable files, a PanicException (BaseException) for odd ones
            first = (str(e).splitlines() or [type(e).__name__])[0][:200]
            raise RuntimeStatusError(Status.BUNDLE_INVALID, f"cannot load tokenizer {path}: {first}; re-export") from None
        got = tok.token_to_id(image_token)
        if got != image_token_id:
            raise RuntimeStatusError(
                Status.BUNDLE_INVALID,
                f"tokenizer {path} maps {image_token!r} to {got}, the manifest says {image_token_id}; re-export the bundle",
            )
        vocab = max(int(vocab_size), tok.get_vocab_size(with_added_tokens=True))
        return cls(tok, image_token, int(image_token_id), tuple(int(i) for i in eos_token_ids),
                   int(slots_before), int(slots_after), vocab)

    def prompt_text(self, prompt: str, template: str, raw: bool) -> str:
        """The full text to encode: the template around `prompt`, or `prompt` itself when `raw`.

        Raises RuntimeStatusError(INVALID_ARGUMENT) unless the result holds exactly one image token.
        """
        if not isinstance(prompt, str):
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"prompt must be a str, got {type(prompt).__name__}")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise RuntimeStatusError(Status.PROMPT_TOO_LONG, f"the prompt has {len(prompt)} characters, more than "
                                     f"{MAX_PROMPT_CHARS}; shorten it")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: Python's stand-ins for bytes that were not UTF-8
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"the prompt is not valid UTF-8 text (character "
                                     f"{e.start} is {prompt[e.start]!a}); pass the prompt as UTF-8") from None
        count = prompt.count(self.image_token)
        if raw:
            if count != 1:
                raise RuntimeStatusError(
                    Status.INVALID_ARGUMENT,
                    f"a raw prompt must contain {self.image_token!r} exactly once (found {count}); "
                    f"write it where the image goes, e.g. \"USER: {self.image_token}\\nWhat is this? ASSISTANT:\"",
                )
            return prompt
        if count:
            raise RuntimeStatusError(
                Status.INVALID_ARGUMENT,
                f"the prompt contains {self.image_token!r} but the chat template already places the image; "
                f"remove it, or pass the whole prompt with --raw-prompt (raw_prompt=True)",
            )
        return apply_template(template, prompt)

    def encode_prompt(self, text: str) -> tuple[list[int], list[int]]:
        """(ids before the image token, ids after it) of `text`, BOS included by the post-processor.

        Raises RuntimeStatusError(INVALID_ARGUMENT) unless `text` encodes to exactly one image token,
        and PROMPT_TOO_LONG when a side exceeds its static text slots.
        """
        try:
            ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        except _NOT_OURS:
            raise
        except BaseException as e:
            raise _tokenizer_failed("encode the prompt", e) from None
        where = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(where) != 1:
            raise RuntimeStatusError(
                Status.INVALID_ARGUMENT,
                f"the prompt encodes to {len(where)} image tokens, exactly 1 is needed; write {self.image_token!r} once",
            )
        before, after = ids[: where[0]], ids[where[0] + 1:]
        for side, got, slots, key in (("before", before, self.slots_before, "text_slots_before_image"),
                                      ("after", after, self.slots_after, "text_slots_after_image")):
            if len(got) > slots:
                raise RuntimeStatusError(
                    Status.PROMPT_TOO_LONG,
                    f"prompt needs {len(got)} text slots {side} the image, the bundle has {slots}; "
                    f"shorten the prompt or raise `shapes.{key}` in the recipe and re-export",
                )
        return before, after

    def check_ids(self, ids) -> list[int]:
        """`ids` (a list, tuple or 1-D integer array) as a list of valid token ids; INVALID_ARGUMENT otherwise."""
        if isinstance(ids, (str, bytes, dict)) or not hasattr(ids, "__len__") or not hasattr(ids, "__iter__"):
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"token ids must be a list of integers, got {type(ids).__name__}")
        if len(ids) > MAX_DECODE_IDS:
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"{len(ids)} token ids are more than {MAX_DECODE_IDS} to decode at once")
        try:
            items = list(ids)
        except TypeError:  # a 0-d array has __len__ and __iter__ yet iterates to a TypeError
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, "token ids must be a list of integers") from None
        return [token_id(t, self.vocab_size) for t in items]

    def decode(self, ids) -> str:
        """Text of `ids`, special tokens skipped. Raises INVALID_ARGUMENT for an id outside the vocabulary."""
        checked = self.check_ids(ids)
        try:
            return self.tokenizer.decode(checked, skip_special_tokens=True)
        except _NOT_OURS:
            raise
        except BaseException as e:
            raise _tokenizer_failed("decode token ids", e) from None

    def stream(self) -> "TextStream":
        return TextStream(self)


class TextStream:
    """Turns token ids, one at a time, into text increments.

    Decodes the whole sequence each time and emits the new suffix, so merges across tokens
    (SentencePiece's leading spaces, multi-byte characters split over byte tokens) come out right.
    Text ending in U+FFFD (an incomplete UTF-8 sequence) is held back until it completes.
    """

    def __init__(self, tokenizer: PromptTokenizer):
        self._tok = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def put(self, token: int) -> str:
        """The text that `token` adds ("" when nothing printable is complete yet).

        Raises INVALID_ARGUMENT for an id outside the vocabulary; the stream is then left as it was."""
        ids = self._ids + [token_id(token, self._tok.vocab_size)]
        text = self._tok.decode(ids)
        self._ids = ids  # only now: a failed call leaves the stream as it was
        if text.endswith("\ufffd"):
            return ""
        if text.startswith(self._emitted):
            delta = text[len(self._emitted):]
        else:  # an earlier increment was re-segmented; emit only what lies past the common prefix
            common = 0
            for a, b in zip(text, self._emitted):
                if a != b:
                    break
                common += 1
            delta = text[max(common, len(self._emitted)):]
        self._emitted = text
        return delta

    def flush(self) -> str:
        """At the end of generation: whatever was held back (an incomplete character decodes to U+FFFD)."""
        text = self._tok.decode(self._ids)
        delta = text[len(self._emitted):] if text.startswith(self._emitted) else ""
        self._emitted = text
        return delta

    @property
    def text(self) -> str:
        return self._emitted
