"""Shared fixtures of the runtime tests: a fake bundle (built with onnx, no torch) and test images."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from fake_bundle import make_fake_bundle


@pytest.fixture(scope="session")
def _fake_bundle_master(tmp_path_factory):
    return make_fake_bundle(tmp_path_factory.mktemp("fake") / "bundle")


@pytest.fixture
def fake_bundle(_fake_bundle_master, tmp_path):
    """(bundle dir, numpy twin of its LM): a private copy, free to tamper with."""
    root, lm = _fake_bundle_master
    dst = tmp_path / "bundle"
    shutil.copytree(root, dst)
    return dst, lm


@pytest.fixture(scope="session")
def images(tmp_path_factory):
    """PNG files of a wide, a tall and a square image (three different crop grids)."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    out = {}
    for name, (h, w) in {"wide": (40, 90), "tall": (90, 40), "square": (60, 60)}.items():
        path = d / f"{name}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
        out[name] = path
    return out


@pytest.fixture
def capi_handles(fake_bundle):
    """Opens (bundle, params) C-API handles on the fake bundle (max_new_tokens set when given) and destroys them
    afterwards (a test may have destroyed them itself), asserting no handle leaked."""
    from edgeprune_runtime import capi
    from edgeprune_runtime.capi import Out
    from edgeprune_runtime.errors import Status

    root, _ = fake_bundle
    start = capi.live_handles()
    opened = []

    def open_handles(max_new_tokens: int | None = None):
        out = Out()
        assert capi.Bundle_Create(str(root), out) == Status.OK
        bundle = out.value
        assert capi.GeneratorParams_Create(out) == Status.OK
        params = out.value
        if max_new_tokens is not None:
            assert capi.GeneratorParams_SetMaxNewTokens(params, max_new_tokens) == Status.OK
        opened.append((bundle, params))
        return bundle, params

    yield open_handles
    for bundle, params in opened:
        capi.GeneratorParams_Destroy(params)
        capi.Bundle_Destroy(bundle)
    assert capi.live_handles() == start
