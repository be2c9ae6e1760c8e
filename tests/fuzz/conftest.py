"""Fixtures and hooks of the fuzz suite (the harness itself is fuzz_harness.py)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from fuzz_harness import WORST, Master, make_master


@pytest.fixture(scope="session")
def master(tmp_path_factory) -> Master:
    return make_master(tmp_path_factory.mktemp("fuzz"))


def pytest_collection_modifyitems(config, items):
    """fuzz_deep tests run only when asked for by name (`-m fuzz_deep`)."""
    if "fuzz_deep" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="opt-in: pytest -m fuzz_deep tests/fuzz")
    for item in items:
        if "fuzz_deep" in item.keywords:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("EDGEPRUNE_FUZZ_REPORT")
    if path and WORST:
        Path(path).write_text(json.dumps(WORST | {"written": time.strftime("%Y-%m-%d %H:%M:%S")}, indent=1))
