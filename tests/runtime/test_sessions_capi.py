"""Long-session calls of the C-shaped API on the fake bundle (no step graph): statuses, and a new conversation on
a done generator's cache."""

import pytest

from edgeprune_runtime import capi
from edgeprune_runtime.capi import Out
from edgeprune_runtime.errors import Status


@pytest.fixture
def handles(capi_handles):
    return capi_handles(max_new_tokens=5)


def _finish(gen) -> tuple:
    out = Out()
    while capi.Generator_IsDone(gen, out) == Status.OK and not out.value:
        assert capi.Generator_GenerateNextToken(gen) == Status.OK
    capi.Generator_GetTokenIds(gen, out)
    return out.value


def test_without_a_step_graph(handles, images):
    bundle, params = handles
    out = Out()
    assert capi.GeneratorParams_SetExactBoundary(params, True) == Status.OK
    assert capi.Generator_Create(bundle, params, str(images["wide"]), "hi", False, out) == Status.INVALID_ARGUMENT
    assert "no step graph" in capi.GetLastError()
    assert capi.GeneratorParams_SetExactBoundary(params, "yes") == Status.INVALID_ARGUMENT
    assert capi.GeneratorParams_SetExactBoundary(params, False) == Status.OK
    assert capi.Generator_Create(bundle, params, str(images["wide"]), "hi", False, out) == Status.OK
    gen = out.value
    assert capi.Generator_GetNextByteProbs(gen, b"", out) == Status.INVALID_ARGUMENT
    assert "exact_boundary" in capi.GetLastError()
    assert capi.Generator_CreateFollowUp(gen, params, "And?", False, out) == Status.INVALID_ARGUMENT  # not done
    _finish(gen)
    assert capi.Generator_CreateFollowUp(gen, params, "And?", False, out) == Status.INVALID_ARGUMENT
    assert "no step graph" in capi.GetLastError() and "follow-up" in capi.GetLastError()
    assert capi.Generator_Destroy(gen) == Status.OK


def test_a_new_conversation_on_a_done_generators_cache(handles, images):
    bundle, params = handles
    out = Out()
    assert capi.Generator_Create(bundle, params, str(images["tall"]), "Is there a dog?", False, out) == Status.OK
    fresh = out.value
    expected = _finish(fresh)
    assert capi.Generator_Create(bundle, params, str(images["wide"]), "What is it?", False, out) == Status.OK
    first = out.value
    assert capi.Generator_CreateOnCache(first, params, str(images["tall"]), "Is there a dog?", False, out) \
        == Status.INVALID_ARGUMENT  # not done yet
    _finish(first)
    assert capi.Generator_CreateOnCache(first, params, str(images["tall"]), "Is there a dog?", False, out) == Status.OK
    second = out.value
    assert capi._objects[second].cache is capi._objects[first].cache
    assert _finish(second) == expected
    assert capi.Generator_GenerateNextToken(first) == Status.INVALID_ARGUMENT  # its cache moved on
    assert capi.Generator_CreateOnCache(first, params, str(images["tall"]), "x", False, out) == Status.INVALID_ARGUMENT
    for g in (fresh, first, second):
        assert capi.Generator_Destroy(g) == Status.OK
