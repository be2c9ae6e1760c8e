"""The server's wire rules without a socket: stop strings against a brute-force cut, image references
(data URLs, paths confined to the image directory, symlinks out of it), and request validation."""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edgeprune_runtime.errors import RuntimeStatusError, Status
from edgeprune_runtime.server.protocol import ApiError, ImagePolicy, StopText, parse_chat_request, resolve_image

ALPHABET = "ab\u00e9c"  # few letters: stop strings occur and overlap often


def _cut(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    """The oracle: generation stops after the first token whose text completes a stop string; the reply is the
    text so far, up to the earliest occurrence of any stop string in it. (Not the earliest occurrence in the whole
    text: pieces=['b\u00e9', 'b'], stops=['\u00e9', 'b\u00e9b'] stops at '\u00e9' after the first piece, and the
    second piece, which would complete 'b\u00e9b', is never generated.)"""
    text = ""
    for piece in pieces:
        text += piece
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return text[:min(hits)], True
    return text, False


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(st.text(ALPHABET, max_size=4), max_size=12),
       stops=st.lists(st.text(ALPHABET, min_size=1, max_size=3), max_size=4))
@example(pieces=["b\u00e9", "b"], stops=["\u00e9", "b\u00e9b"])  # the first complete stop wins, not the earliest start
def test_stop_text_cuts_where_the_whole_text_first_holds_a_stop(pieces, stops):
    cutter = StopText(tuple(stops))
    sent = []
    for piece in pieces:
        if cutter.stopped:
            break
        sent.append(cutter.feed(piece))
        assert not any(s in "".join(sent) for s in stops)  # nothing past a stop ever leaves
    if not cutter.stopped:
        sent.append(cutter.flush())
    assert ("".join(sent), cutter.stopped) == _cut(pieces, stops)


def _body(url="data:image/png;base64,iVBORw0KGgo=", **extra) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": url}}]}], **extra}


NO_PATHS = ImagePolicy(None)


def test_a_good_request_and_its_defaults():
    r = parse_chat_request(_body(), "tiny", NO_PATHS)
    assert (r.prompt, r.image, r.max_tokens, r.temperature, r.top_p, r.seed, r.stop, r.stream) == \
        ("What?", base64.b64decode("iVBORw0KGgo="), 0, 1.0, 1.0, 0, (), False)
    r = parse_chat_request(_body(max_completion_tokens=5, max_tokens=9, temperature=None, stop="x", stream=True,
                                 stream_options={"include_usage": True}, model=None), "tiny", NO_PATHS)
    assert (r.max_tokens, r.temperature, r.stop, r.stream, r.include_usage) == (5, 1.0, ("x",), True, True)


@pytest.mark.parametrize("body, status, words", [
    ([], 400, "JSON object"),
    (_body(model="other"), 404, "not served here"),
    ({**_body(), "messages": []}, 400, "non-empty list"),
    ({**_body(), "messages": [{"role": "system", "content": "be brief"}] + _body()["messages"]}, 400, "single-turn"),
    ({**_body(), "messages": [{"role": "user", "content": "hi"}]}, 400, "missing image"),
    ({**_body(), "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, 400, "missing image"),
    ({**_body(), "messages": [{"role": "user", "content": _body()["messages"][0]["content"] * 2}]}, 400, "2 images"),
    ({**_body(), "messages": [{"role": "user", "content": [{"type": "audio"}]}]}, 400, "content[0]"),
    ({**_body(), "messages": [{"role": "user", "content": _body()["messages"][0]["content"][1:]}]}, 400, "no text"),
    (_body(temperature=2.5), 400, "temperature"),
    (_body(temperature="hot"), 400, "temperature"),
    (_body(top_p=0), 400, "top_p"),
    (_body(seed=-4), 400, "seed"),
    (_body(seed=1.5), 400, "seed"),
    (_body(max_tokens=0), 400, "max_tokens"),
    (_body(max_tokens=True), 400, "max_tokens"),
    (_body(stream="yes"), 400, "stream"),
    (_body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    (_body(stop=[""]), 400, "stop"),
    (_body(n=3), 400, "n must be 1"),
    (_body(tools=[{"type": "function"}]), 400, "tools"),
    (_body(url="data:image/png,rawbytes"), 400, "base64"),
    (_body(url="data:text/plain;base64,aGk="), 400, "not an image"),
    (_body(url="data:image/png;base64,!!"), 400, "malformed"),
    (_body(url="http://example.com/a.png"), 400, "not fetched"),
    (_body(url="cam.png"), 400, "turned off"),
])
def test_bad_requests_name_the_problem(body, status, words):
    with pytest.raises(ApiError) as e:
        parse_chat_request(body, "tiny", NO_PATHS)
    assert e.value.status == status and words in e.value.message, e.value.message
    assert e.value.to_dict()["error"]["type"] == ("invalid_request_error" if status < 500 else "server_error")


def test_local_paths_stay_inside_the_image_directory(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "cam.png").write_bytes(b"png")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"png")
    (root / "link.png").symlink_to(secret)
    policy = ImagePolicy(root.resolve())
    expected = os.fspath((root / "sub" / "cam.png").resolve())
    for ref in ("sub/cam.png", expected, (root / "sub" / "cam.png").as_uri(), "file://localhost" + expected):
        assert resolve_image(ref, policy) == expected, ref
    for ref, words in (("../secret.png", "outside"), (str(secret), "outside"), ("link.png", "outside"),
                       (secret.as_uri(), "outside"), ("sub/none.png", "not found"), ("file://other/x.png", "local files")):
        with pytest.raises(ApiError) as e:
            resolve_image(ref, policy)
        assert e.value.status == 400 and words in e.value.message, (ref, e.value.message)


@pytest.mark.parametrize("status, http", [(Status.IMAGE_INVALID, 400), (Status.PROMPT_TOO_LONG, 400),
                                          (Status.RESOURCE_LIMIT, 413), (Status.INFERENCE_FAILED, 500),
                                          (Status.INTERNAL_ERROR, 500)])
def test_runtime_statuses_map_to_http(status, http):
    e = ApiError.from_runtime(RuntimeStatusError(status, "why"))
    assert (e.status, e.message, e.code) == (http, "why", status.name.lower())
