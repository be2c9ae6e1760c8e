"""Fuzzing what a caller hands the runtime: images (every Pillow mode, every format, corrupt bytes, huge
declared sizes), prompts (any Unicode, lone surrogates included), every C-API function with arbitrary
arguments, and sampling parameters.

Property: a status, never an exception or INTERNAL_ERROR, a one-line message; memory within the budget.
"""

from __future__ import annotations

import inspect
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import assume, event, given
from hypothesis import strategies as st

from edgeprune_runtime import Status, capi
from edgeprune_runtime.budget import image_bytes
from edgeprune_runtime.errors import RuntimeStatusError
from edgeprune_runtime.sampling import Sampler
from fuzz_harness import BUDGET_MB, RSS, RSS_SLACK, check_status, fuzz_settings
from fuzz_strategies import IMAGE_FORMATS, api_values, byte_mutation, pil_images

CI = {"images": 60, "headers": 25, "prompts": 40, "capi": 100, "sampling": 150}
IMAGE_STATUSES = {Status.OK, Status.IMAGE_INVALID, Status.RESOURCE_LIMIT}


@pytest.fixture(scope="module")
def handles(master):
    """(bundle, params) handles on the master bundle under the fuzz budget, max_new_tokens 1."""
    out, params = capi.Out(), capi.Out()
    assert capi.Bundle_Create(str(master.bundle), out, memory_budget_mb=BUDGET_MB) == Status.OK
    capi.GeneratorParams_Create(params)
    capi.GeneratorParams_SetMaxNewTokens(params.value, 1)
    yield out.value, params.value
    capi.GeneratorParams_Destroy(params.value)
    capi.Bundle_Destroy(out.value)


def request(handles, image, prompt="What is this?", raw=False, allowed=None) -> Status:
    """Generator_Create + one token; the status of the first call that is not OK."""
    bundle, params = handles
    out = capi.Out()
    if RSS.works:
        RSS.start()
    status = check_status(capi.Generator_Create(bundle, params, image, prompt, raw, out), allowed)
    if status == Status.OK:
        status = check_status(capi.Generator_GenerateNextToken(out.value))
        capi.Generator_Destroy(out.value)
    assert RSS.growth() <= (BUDGET_MB << 20) + RSS_SLACK, f"resident memory grew {RSS.growth()} bytes"
    event(status.name)
    return status


# --- images ---------------------------------------------------------------------------------------------------


def image_property(master, handles, data):
    image = data.draw(pil_images(), label="image")
    how = data.draw(st.sampled_from(["pil", "file", "corrupt file"]), label="how")
    if how == "pil":
        request(handles, image, allowed=IMAGE_STATUSES)
        return
    fmt = data.draw(st.sampled_from(IMAGE_FORMATS), label="format")
    buf = io.BytesIO()
    try:
        image.save(buf, fmt)
    except (OSError, ValueError, KeyError, TypeError):
        assume(False)  # Pillow cannot write this mode in this format
    raw = buf.getvalue()
    if how == "corrupt file":
        raw, _ = data.draw(byte_mutation(raw), label="bytes")
    path = master.work / f"image.{fmt.lower()}"
    path.write_bytes(raw)
    request(handles, str(path), allowed=IMAGE_STATUSES)


@fuzz_settings(CI["images"])
@given(st.data())
def test_images(master, handles, data):
    image_property(master, handles, data)


@pytest.mark.fuzz_deep
@fuzz_settings(CI["images"], deep=True)
@given(st.data())
def test_images_deep(master, handles, data):
    image_property(master, handles, data)


def _png(width: int, height: int, rows: int, mode_byte: int) -> bytes:
    """A PNG that declares width x height (colour type `mode_byte`) and holds `rows` zero rows of data."""
    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    channels = {0: 1, 2: 3, 4: 2, 6: 4}[mode_byte]
    body = zlib.compress(b"\0" * min(rows * (width * channels + 1), 1 << 22))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, mode_byte, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def header_property(master, handles, data):
    """Declared sizes up to 2**31 per side with little or no data: refused before the pixels are allocated."""
    width = data.draw(st.one_of(st.integers(1, 3000), st.integers(1, 2 ** 31 - 1)), label="width")
    height = data.draw(st.one_of(st.integers(1, 3000), st.integers(1, 2 ** 31 - 1)), label="height")
    path = master.work / "header.png"
    path.write_bytes(_png(width, height, data.draw(st.integers(0, 3)), data.draw(st.sampled_from([0, 2, 4, 6]))))
    status = request(handles, str(path), allowed=IMAGE_STATUSES)
    if image_bytes(width, height) > BUDGET_MB << 20:
        assert status != Status.OK


@fuzz_settings(CI["headers"])
@given(st.data())
def test_declared_image_sizes(master, handles, data):
    header_property(master, handles, data)


@pytest.mark.fuzz_deep
@fuzz_settings(CI["headers"], deep=True)
@given(st.data())
def test_declared_image_sizes_deep(master, handles, data):
    header_property(master, handles, data)


# --- prompts -------------------------------------------------------------------------------------------------


def prompt_property(master, handles, data):
    text = data.draw(st.text(st.characters(exclude_categories=()), max_size=60), label="prompt")
    raw = data.draw(st.booleans(), label="raw")
    if raw and data.draw(st.booleans(), label="with image token"):
        text = text[: len(text) // 2] + "<image>" + text[len(text) // 2:]
    request(handles, str(master.image), text, raw,
            allowed={Status.OK, Status.INVALID_ARGUMENT, Status.PROMPT_TOO_LONG, Status.CACHE_FULL})


@fuzz_settings(CI["prompts"])
@given(st.data())
def test_prompts(master, handles, data):
    prompt_property(master, handles, data)


@pytest.mark.fuzz_deep
@fuzz_settings(CI["prompts"], deep=True)
@given(st.data())
def test_prompts_deep(master, handles, data):
    prompt_property(master, handles, data)


# --- every C-API function, any arguments ---------------------------------------------------------------------


FUNCTIONS = sorted(name for name in capi.__all__ if "_" in name and callable(getattr(capi, name)) and name[0].isupper())


def capi_property(master, data):
    """Fresh live handles of every kind, then one function called with arguments drawn from anything."""
    out = capi.Out()
    live = []
    assert capi.Bundle_Create(str(master.bundle), out, memory_budget_mb=BUDGET_MB) == Status.OK
    bundle = out.value
    capi.GeneratorParams_Create(out)
    params = out.value
    capi.GeneratorParams_SetMaxNewTokens(params, 2)
    capi.Generator_Create(bundle, params, str(master.image), "hi", False, out)
    generator = out.value
    capi.TokenizerStream_Create(bundle, out)
    stream = out.value
    live = [bundle, params, generator, stream, 0, -1, 10 ** 9]
    plausible = {  # by parameter name: the argument a correct caller passes (half the time)
        "bundle": st.just(bundle), "params": st.just(params), "generator": st.just(generator), "stream": st.just(stream),
        "out": st.builds(capi.Out), "path": st.sampled_from([str(master.bundle), master.bundle]),
        "image": st.sampled_from([str(master.image), master.image]), "prompt": st.text(max_size=30),
        "raw_prompt": st.booleans(), "token_id": st.integers(-5, 600), "token_ids": st.lists(st.integers(-5, 600), max_size=6),
        "max_new_tokens": st.integers(-2, 100), "temperature": st.floats(-1, 5), "top_p": st.floats(-0.5, 1.5),
        "seed": st.integers(-3, 2 ** 70), "ignore_eos": st.booleans(), "verify_hashes": st.booleans(),
    }
    try:
        name = data.draw(st.sampled_from(FUNCTIONS), label="function")
        fn = getattr(capi, name)
        names = list(inspect.signature(fn.__wrapped__).parameters)
        count = data.draw(st.integers(max(len(names) - 2, 0), len(names) + 1), label="argument count")
        anything = api_values(live) | st.builds(capi.Out)
        args = []
        for i in range(count):
            right = plausible.get(names[i]) if i < len(names) else None
            use = right if right is not None and data.draw(st.booleans(), label=f"plausible {i}") else anything
            args.append(data.draw(use, label=f"arg {i}"))
        event(f"{name}: {check_status(fn(*args)).name}")
    finally:
        for destroy, handle in ((capi.Generator_Destroy, generator), (capi.TokenizerStream_Destroy, stream),
                                (capi.GeneratorParams_Destroy, params), (capi.Bundle_Destroy, bundle)):
            destroy(handle)  # INVALID_ARGUMENT when the fuzzed call destroyed it already


@fuzz_settings(CI["capi"])
@given(st.data())
def test_capi_arguments(master, data):
    capi_property(master, data)


@pytest.mark.fuzz_deep
@fuzz_settings(CI["capi"], deep=True)
@given(st.data())
def test_capi_arguments_deep(master, data):
    capi_property(master, data)


# --- sampling ---------------------------------------------------------------------------------------------------


def sampling_property(data):
    temperature = data.draw(st.one_of(st.floats(min_value=0, allow_infinity=False), st.floats(), st.just(5e-324)),
                            label="temperature")
    top_p = data.draw(st.one_of(st.floats(min_value=0, max_value=1), st.floats()), label="top_p")
    seed = data.draw(st.integers(0, 2 ** 64), label="seed")
    scale = data.draw(st.sampled_from([1.0, 1e-30, 1e10, 3e38]), label="logit scale")
    with np.errstate(over="ignore"):  # the test's own cast to float32 may overflow; such logits are skipped
        logits = (np.random.default_rng(seed % 2 ** 32).standard_normal(64) * scale).astype(np.float32)
    assume(np.isfinite(logits).all())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a numpy overflow or invalid-value warning fails the property
        try:
            sampler = Sampler(temperature, top_p, seed)
        except RuntimeStatusError as e:
            assert e.status == Status.INVALID_ARGUMENT
            assert not (0 <= temperature < float("inf") and 0 < top_p <= 1)
            return
        token = sampler(logits)
    assert 0 <= token < len(logits)
    if temperature == 0 or temperature < 1e-300:
        assert token == int(np.argmax(logits))  # greedy, and the greedy limit of tiny temperatures


@fuzz_settings(CI["sampling"])
@given(st.data())
def test_sampling(data):
    sampling_property(data)


@pytest.mark.fuzz_deep
@fuzz_settings(CI["sampling"], deep=True)
@given(st.data())
def test_sampling_deep(data):
    sampling_property(data)
