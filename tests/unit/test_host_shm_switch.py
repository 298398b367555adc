"""zero_optimization.host_shared_memory, and DEEPSHARD_HOST_SHM as its documented override."""

from __future__ import annotations

import pytest

from deepshard.comm.host_shm import enabled
from deepshard.config import load_config


def test_the_key_decides_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPSHARD_HOST_SHM", raising=False)
    assert enabled(True) and not enabled(False)
    cfg = load_config({"train_batch_size": 2, "zero_optimization": {"stage": 2, "host_shared_memory": False}})
    assert cfg.zero_optimization.host_shared_memory is False
    assert load_config({"train_batch_size": 2}).zero_optimization.host_shared_memory is True


@pytest.mark.parametrize(("env", "configured", "expected"), [("0", True, False), ("1", False, True)])
def test_the_variable_overrides_the_key(
    monkeypatch: pytest.MonkeyPatch, env: str, configured: bool, expected: bool
) -> None:
    monkeypatch.setenv("DEEPSHARD_HOST_SHM", env)
    assert enabled(configured) is expected
