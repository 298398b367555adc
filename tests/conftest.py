"""Shared fixtures: one spawned gloo group per world size, reused by every distributed test."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from deepshard.testing import DistributedHarness

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

_HARNESSES: dict[int, DistributedHarness] = {}


def _harness(world_size: int) -> DistributedHarness:
    harness = _HARNESSES.get(world_size)
    if harness is None:
        harness = DistributedHarness(world_size, timeout_s=240)
        _HARNESSES[world_size] = harness
    return harness


@pytest.fixture(scope="session")
def dist2() -> Iterator[DistributedHarness]:
    """Two gloo ranks."""
    yield _harness(2)


@pytest.fixture(scope="session")
def dist4() -> Iterator[DistributedHarness]:
    """Four gloo ranks."""
    yield _harness(4)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for harness in _HARNESSES.values():
        harness.close()
