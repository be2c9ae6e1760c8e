import pytest

from edgeprune_runtime.env import env_flag, env_int
from edgeprune_runtime.errors import RuntimeStatusError, Status


@pytest.mark.parametrize("raw, expected", [("1", True), ("true", True), ("ON", True), ("0", False), ("false", False),
                                           ("", False), ("off", False)])
def test_flag_values(monkeypatch, raw, expected):
    monkeypatch.setenv("EDGEPRUNE_TEST_FLAG", raw)
    assert env_flag("EDGEPRUNE_TEST_FLAG") is expected


def test_flag_unset_is_default(monkeypatch):
    monkeypatch.delenv("EDGEPRUNE_TEST_FLAG", raising=False)
    assert env_flag("EDGEPRUNE_TEST_FLAG") is False
    assert env_flag("EDGEPRUNE_TEST_FLAG", default=True) is True


def test_flag_garbage_is_an_error(monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_TEST_FLAG", "maybe")
    with pytest.raises(RuntimeStatusError) as e:
        env_flag("EDGEPRUNE_TEST_FLAG")
    assert e.value.status == Status.INVALID_ARGUMENT and "EDGEPRUNE_TEST_FLAG" in e.value.message


def test_int(monkeypatch):
    monkeypatch.delenv("EDGEPRUNE_TEST_INT", raising=False)
    assert env_int("EDGEPRUNE_TEST_INT") is None
    monkeypatch.setenv("EDGEPRUNE_TEST_INT", " 4 ")
    assert env_int("EDGEPRUNE_TEST_INT", minimum=1) == 4
    for bad in ("four", "0"):
        monkeypatch.setenv("EDGEPRUNE_TEST_INT", bad)
        with pytest.raises(RuntimeStatusError) as e:
            env_int("EDGEPRUNE_TEST_INT", minimum=1)
        assert e.value.status == Status.INVALID_ARGUMENT
