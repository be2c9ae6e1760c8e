"""The OpenAI chat-completions wire format, as far as one bundle can serve it: request parsing, images,
stop strings and response bodies. Plain Python (no web framework), so every rule is tested without a socket.

A bundle's chat template is single-turn with one image, so a request is one `user` message holding text
and exactly one image (`image_url` part: a `data:` URL or a local path). Everything a client can get wrong
becomes an `ApiError` with the HTTP status and the message the JSON error body carries.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from edgeprune_runtime.errors import RuntimeStatusError, Status

MAX_STOP_STRINGS = 4  # as the OpenAI API
MAX_STOP_CHARS = 256
MAX_PROMPT_CHARS = 1 << 16  # a prompt must fit the bundle's text slots (tens to hundreds of tokens) anyway

# HTTP status of each runtime status a request can cause; the others are the server's fault (500).
_HTTP_STATUS = {
    Status.INVALID_ARGUMENT: 400,
    Status.IMAGE_INVALID: 400,
    Status.PROMPT_TOO_LONG: 400,
    Status.CACHE_FULL: 400,
    Status.RESOURCE_LIMIT: 413,
}


class ApiError(Exception):
    """A request the server refuses: HTTP `status`, and the OpenAI-style error body of `to_dict()`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    @classmethod
    def from_runtime(cls, e: RuntimeStatusError) -> "ApiError":
        return cls(_HTTP_STATUS.get(e.status, 500), e.message, code=e.status.name.lower())


@dataclass(frozen=True)
class ChatRequest:
    """One parsed /v1/chat/completions request."""

    prompt: str  # the user's text parts joined with "\n"; goes into the bundle's chat template
    image: bytes | str  # encoded image bytes (from a data URL) or a local file path
    max_tokens: int  # 0: until EOS or the KV cache is full
    temperature: float
    top_p: float
    seed: int
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: one more chunk with the token counts


@dataclass(frozen=True)
class ImagePolicy:
    """Where local image paths may be read from (None: nowhere, data URLs only)."""

    root: Path | None


def parse_chat_request(body, served_model: str, images: ImagePolicy) -> ChatRequest:
    """`body`: the decoded JSON. Raises ApiError (400, or 404 for another model name)."""
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {_json_type(body)}")
    model = body.get("model")
    if model is not None and model != served_model:
        raise ApiError(404, f"model {_show(model)} is not served here; this server serves {served_model!r} "
                            "(GET /v1/models)", param="model", code="model_not_found")
    for key, why in (("tools", "tool calls"), ("functions", "function calls"), ("audio", "audio output")):
        if body.get(key) not in (None, [], {}):
            raise ApiError(400, f"`{key}` is not supported: edgeprune bundles do not do {why}", param=key)
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise ApiError(400, f"n must be 1 (one answer per request), got {_show(n)}", param="n")
    if body.get("logprobs") not in (None, False):
        raise ApiError(400, "logprobs are not supported", param="logprobs")

    prompt, image_url = _one_user_turn(body.get("messages"))
    which = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = body.get(which)
    if max_tokens is not None:
        max_tokens = _integer(max_tokens, which, minimum=1)
    temperature = _number(_given(body, "temperature", 1.0), "temperature", 0.0, 2.0)  # 1.0: the OpenAI API's default
    top_p = _number(_given(body, "top_p", 1.0), "top_p", 0.0, 1.0)
    if top_p == 0.0:
        raise ApiError(400, "top_p must be in (0, 1], got 0", param="top_p")
    seed = _integer(_given(body, "seed", 0), "seed", minimum=0)  # 0: the same request gives the same answer
    stream = _given(body, "stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {_show(stream)}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, f"stream_options must be an object, got {_json_type(options)}", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "stream_options.include_usage must be true or false", param="stream_options")
    return ChatRequest(prompt=prompt, image=resolve_image(image_url, images), max_tokens=max_tokens or 0,
                       temperature=temperature, top_p=top_p, seed=seed, stop=_stops(body.get("stop")),
                       stream=stream, include_usage=include_usage)


def _given(body: dict, key: str, default):
    """body[key], or `default` when the key is missing or null (clients send both for "not given")."""
    value = body.get(key)
    return default if value is None else value


def _one_user_turn(messages) -> tuple[str, str]:
    """(text, image URL) of the one user message. The bundle's chat template has one user turn and one image."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    if len(messages) != 1 or not isinstance(messages[0], dict) or messages[0].get("role") != "user":
        roles = [m.get("role") if isinstance(m, dict) else _json_type(m) for m in messages]
        raise ApiError(400, f"send exactly one message with role 'user' (got roles {roles}): the bundle's chat "
                            "template is single-turn, with no system prompt", param="messages")
    content = messages[0].get("content")
    if isinstance(content, str):
        raise ApiError(400, "missing image: the user message's content must be a list holding one "
                            '{"type": "image_url", "image_url": {"url": ...}} part and text parts',
                       param="messages[0].content", code="missing_image")
    if not isinstance(content, list):
        raise ApiError(400, f"messages[0].content must be a list of parts, got {_json_type(content)}",
                       param="messages[0].content")
    texts, urls = [], []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise ApiError(400, f"content[{i}].image_url.url must be a non-empty string",
                               param=f"messages[0].content[{i}]")
            urls.append(url)
        else:
            raise ApiError(400, f"content[{i}] must be a {{type: text, text}} or {{type: image_url, image_url: "
                                f"{{url}}}} part, got {_show(part)}", param=f"messages[0].content[{i}]")
    if not urls:
        raise ApiError(400, "missing image: add one image_url part (a data: URL or a local path) to the user message",
                       param="messages[0].content", code="missing_image")
    if len(urls) > 1:
        raise ApiError(400, f"the message holds {len(urls)} images; the bundle takes exactly one",
                       param="messages[0].content")
    prompt = "\n".join(texts)
    if not prompt.strip():
        raise ApiError(400, "the user message has no text; add a text part with the question",
                       param="messages[0].content")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"the prompt has {len(prompt)} characters, more than {MAX_PROMPT_CHARS}",
                       param="messages[0].content", code="prompt_too_long")
    return prompt, urls[0]


def resolve_image(url: str, policy: ImagePolicy) -> bytes | str:
    """A `data:` URL -> its bytes; a local path or `file://` URL -> the path (inside `policy.root`).

    Raises ApiError(400) for remote URLs (the server fetches nothing), malformed data URLs and paths outside
    the image directory."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(400, "a data URL image must be base64: data:image/png;base64,<data>", param="image_url")
        media = header[len("data:"):-len(";base64")]
        if media and not media.startswith("image/"):
            raise ApiError(400, f"the data URL says {media!r}, not an image type", param="image_url")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ApiError(400, "the data URL's base64 payload is malformed", param="image_url") from None
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ApiError(400, f"file URL host {parts.netloc!r}: only local files can be read", param="image_url")
        path = unquote(parts.path)
    elif len(parts.scheme) > 1:  # http, https, ftp... (a one-letter scheme is a Windows drive)
        raise ApiError(400, f"{parts.scheme}:// images are not fetched; send a data: URL or a local path",
                       param="image_url")
    else:
        path = url
    if policy.root is None:
        raise ApiError(400, "local image paths are turned off on this server (--image-dir none); send a data: URL",
                       param="image_url")
    if "\0" in path:
        raise ApiError(400, "the image path holds a NUL character", param="image_url")
    full = (policy.root / path).resolve()  # an absolute `path` replaces the root; symlinks resolved
    if not full.is_relative_to(policy.root):
        raise ApiError(400, f"image path {path!r} is outside the image directory {str(policy.root)!r}; move the "
                            "file there, start serve with another --image-dir, or send a data: URL", param="image_url")
    if not full.is_file():
        raise ApiError(400, f"image file {path!r} not found (paths are read on the server, relative to "
                            f"{str(policy.root)!r})", param="image_url")
    return os.fspath(full)


def _stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if (not isinstance(stops, list) or len(stops) > MAX_STOP_STRINGS
            or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops)):
        raise ApiError(400, f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings "
                            f"of at most {MAX_STOP_CHARS} characters", param="stop")
    return tuple(stops)


def _number(value, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ApiError(400, f"{name} must be a number in [{low:g}, {high:g}], got {_show(value)}", param=name)
    return float(value)


def _integer(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ApiError(400, f"{name} must be an integer >= {minimum}, got {_show(value)}", param=name)
    return value


def _json_type(value) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")


def _show(value, limit: int = 60) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


class StopText:
    """Cuts the generated text at the first stop string. `feed` returns the text that is safe to send now:
    a tail that could still grow into a stop string is held back until the next token decides."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(self.pending) + 1))
                    if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


# --- responses ---------------------------------------------------------------------------------

FINISH_REASON = {"eos": "stop", "stop": "stop", "max_new_tokens": "length", "cache_full": "length"}


@dataclass
class Completion:
    """What one request produced, for the response bodies."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def chunk(self, delta: dict, finish_reason: str | None = None, token_ids: list[int] | None = None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        if token_ids is not None:
            choice["token_ids"] = token_ids  # extension: the ids behind this delta
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [choice]}

    def usage_chunk(self, usage: dict) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": usage}

    def message(self, text: str, finish_reason: str, token_ids: list[int], usage: dict, timings: dict) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish_reason, "token_ids": token_ids}],
                "usage": usage, "timings": timings}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
