"""The C-API-shaped layer: handles, statuses, out-parameters, last error, buffer lifetimes."""

import threading

import numpy as np
import pytest

from edgeprune_runtime import capi
from edgeprune_runtime.capi import Out
from edgeprune_runtime.errors import Status

PROMPT = "What is in the picture?"


@pytest.fixture
def handles(capi_handles):
    """(bundle, params) handles, destroyed afterwards; asserts nothing leaked (conftest.capi_handles)."""
    return capi_handles()


def test_full_request(handles, images):
    bundle, params = handles
    out = Out()
    assert capi.GeneratorParams_SetMaxNewTokens(params, 5) == Status.OK
    assert capi.Generator_Create(bundle, params, str(images["wide"]), PROMPT, False, out) == Status.OK
    gen = out.value
    assert isinstance(gen, int) and gen != 0
    assert capi.Generator_GetNextTokenId(gen, out) == Status.INVALID_ARGUMENT  # no token yet
    tokens = []
    while capi.Generator_IsDone(gen, out) == Status.OK and not out.value:
        assert capi.Generator_GenerateNextToken(gen) == Status.OK
        assert capi.Generator_GetNextTokenId(gen, out) == Status.OK
        tokens.append(out.value)
    assert capi.Generator_GetTokenIds(gen, out) == Status.OK and out.value == tuple(tokens)
    assert capi.Generator_GetStopReason(gen, out) == Status.OK and out.value == "max_new_tokens"
    assert capi.Generator_GetVisualTokens(gen, out) == Status.OK and out.value > 0
    assert capi.Generator_GetTimings(gen, out) == Status.OK and out.value["tokens"] == 5
    assert capi.Generator_GenerateNextToken(gen) == Status.INVALID_ARGUMENT
    assert "done" in capi.GetLastError()
    assert capi.Generator_Destroy(gen) == Status.OK


def test_logits_view_is_read_only_and_valid_until_the_next_step(handles, images):
    bundle, params = handles
    out = Out()
    assert capi.GeneratorParams_SetMaxNewTokens(params, 0) == Status.OK
    assert capi.Generator_Create(bundle, params, str(images["wide"]), PROMPT, False, out) == Status.OK
    gen = out.value
    assert capi.Generator_GenerateNextToken(gen) == Status.OK
    assert capi.Generator_GenerateNextToken(gen) == Status.OK
    assert capi.Generator_GetLogits(gen, out) == Status.OK
    view = out.value
    assert capi.Generator_GetNextTokenId(gen, out) == Status.OK
    assert int(np.argmax(view)) == out.value  # greedy: the token came from these logits
    with pytest.raises(ValueError):
        view[0] = 1.0
    kept = view.copy()
    assert capi.Generator_GenerateNextToken(gen) == Status.OK
    assert not np.array_equal(view, kept)  # documented: the view now shows the next step's logits
    capi.Generator_Destroy(gen)


def test_wrong_destroyed_and_foreign_handles(handles):
    bundle, params = handles
    out = Out()
    assert capi.Generator_IsDone(bundle, out) == Status.INVALID_ARGUMENT  # a Bundle is not a Generator
    assert "not a live Generator handle" in capi.GetLastError()
    assert capi.Generator_IsDone(123456, out) == Status.INVALID_ARGUMENT
    assert capi.Generator_IsDone("1", out) == Status.INVALID_ARGUMENT
    assert capi.GeneratorParams_Create(out) == Status.OK
    extra = out.value
    assert capi.GeneratorParams_Destroy(extra) == Status.OK
    assert capi.GeneratorParams_Destroy(extra) == Status.INVALID_ARGUMENT  # double destroy
    assert capi.GeneratorParams_SetSeed(extra, 1) == Status.INVALID_ARGUMENT


def test_out_parameter_must_be_an_out_box(handles):
    bundle, _ = handles
    assert capi.Bundle_GetShapes(bundle, [None]) == Status.INVALID_ARGUMENT
    assert "Out()" in capi.GetLastError()


@pytest.mark.parametrize("setter, bad", [
    (capi.GeneratorParams_SetMaxNewTokens, -1), (capi.GeneratorParams_SetMaxNewTokens, 2.5),
    (capi.GeneratorParams_SetTemperature, -1.0), (capi.GeneratorParams_SetTemperature, float("inf")),
    (capi.GeneratorParams_SetTopP, 0.0), (capi.GeneratorParams_SetTopP, 1.01), (capi.GeneratorParams_SetSeed, -3),
])
def test_bad_params_are_refused_and_leave_the_old_value(handles, setter, bad):
    _, params = handles
    assert setter(params, bad) == Status.INVALID_ARGUMENT
    assert capi.GetLastError()
    p = capi._objects[params]
    assert (p.max_new_tokens, p.temperature, p.top_p, p.seed) == (32, 0.0, 1.0, 0)


def test_last_error_is_per_thread(handles):
    bundle, _ = handles
    assert capi.Generator_IsDone(bundle, Out()) == Status.INVALID_ARGUMENT
    mine = capi.GetLastError()
    seen = []

    def other():
        seen.append(capi.GetLastError())
        capi.Bundle_Create("/no/such/bundle", Out())
        seen.append(capi.GetLastError())

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen[0] == "" and "does not exist" in seen[1]
    assert capi.GetLastError() == mine


def test_statuses_of_create_failures(handles, images, tmp_path):
    bundle, params = handles
    out = Out()
    assert capi.Bundle_Create(tmp_path / "missing", out) == Status.BUNDLE_INVALID and out.value is None
    assert capi.Generator_Create(bundle, params, str(tmp_path / "no.png"), PROMPT, False, out) == Status.IMAGE_INVALID
    assert capi.Generator_Create(bundle, params, str(images["wide"]), "word " * 200, False, out) == Status.PROMPT_TOO_LONG
    assert capi.Generator_Create(bundle, params, str(images["wide"]), PROMPT, True, out) == Status.INVALID_ARGUMENT
    assert "<image>" in capi.GetLastError()
    assert out.value is None  # untouched on failure


def test_params_are_copied_at_generator_creation(handles, images):
    bundle, params = handles
    out = Out()
    capi.GeneratorParams_SetMaxNewTokens(params, 2)
    capi.Generator_Create(bundle, params, str(images["wide"]), PROMPT, False, out)
    gen = out.value
    capi.GeneratorParams_SetMaxNewTokens(params, 7)
    while capi.Generator_IsDone(gen, out) == Status.OK and not out.value:
        capi.Generator_GenerateNextToken(gen)
    capi.Generator_GetTokenIds(gen, out)
    assert len(out.value) == 2
    capi.Generator_Destroy(gen)


def test_tokenizer_stream(handles):
    bundle, _ = handles
    out = Out()
    capi.Bundle_GetManifest(bundle, out)
    assert out.value["tokenizer"]["image_token"] == "<image>"
    capi.TokenizerStream_Create(bundle, out)
    stream = out.value
    text = ""
    for token in capi._objects[bundle].tokenizer.tokenizer.encode("a red cup", add_special_tokens=False).ids:
        assert capi.TokenizerStream_Decode(stream, token, out) == Status.OK
        text += out.value
    assert text == "a red cup"
    assert capi.TokenizerStream_Destroy(stream) == Status.OK
