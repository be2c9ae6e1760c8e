"""Prompt -> token ids around the image, and generated ids -> text (also incrementally).

The bundle's `tokenizer.json` is loaded with `tokenizers` (no transformers). The prompt is
encoded as ONE string with special tokens (the tokenizer's post-processor adds BOS, exactly as
the Hugging Face processor does) and split at the single image token: the ids before it fill the
T1 text slots before the visual slots, the ids after it the T2 slots after them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeprune_runtime.errors import RuntimeStatusError, Status

PROMPT_PLACEHOLDER = "{prompt}"


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

    @classmethod
    def from_file(cls, path: str | Path, image_token: str, image_token_id: int, eos_token_ids,
                  slots_before: int, slots_after: int) -> "PromptTokenizer":
        """Loads `tokenizer.json`. Raises RuntimeStatusError(BUNDLE_INVALID) when the file cannot be
        parsed or its id for `image_token` differs from the manifest's `image_token_id`."""
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for unparsable files
            raise RuntimeStatusError(Status.BUNDLE_INVALID, f"cannot load tokenizer {path}: {str(e).splitlines()[0]}; re-export") from None
        got = tok.token_to_id(image_token)
        if got != image_token_id:
            raise RuntimeStatusError(
                Status.BUNDLE_INVALID,
                f"tokenizer {path} maps {image_token!r} to {got}, the manifest says {image_token_id}; re-export the bundle",
            )
        return cls(tok, image_token, int(image_token_id), tuple(int(i) for i in eos_token_ids),
                   int(slots_before), int(slots_after))

    def prompt_text(self, prompt: str, template: str, raw: bool) -> str:
        """The full text to encode: the template around `prompt`, or `prompt` itself when `raw`.

        Raises RuntimeStatusError(INVALID_ARGUMENT) unless the result holds exactly one image token.
        """
        if not isinstance(prompt, str):
            raise RuntimeStatusError(Status.INVALID_ARGUMENT, f"prompt must be a str, got {type(prompt).__name__}")
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
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
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

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

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

    def put(self, token_id: int) -> str:
        """The text that `token_id` adds ("" when nothing printable is complete yet)."""
        self._ids.append(int(token_id))
        text = self._tok.decode(self._ids)
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
