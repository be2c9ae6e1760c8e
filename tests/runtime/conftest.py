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
