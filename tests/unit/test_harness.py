"""The multi-process test harness: results in rank order, errors with tracebacks, hangs as timeouts.

Uses its own two-rank harness (not the shared fixture), because these tests tear the ranks down.
"""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist

from deepshard.testing import DistributedHarness, RankError


def _rank_and_sum(offset: int) -> tuple[int, int, float]:
    import torch

    t = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(t)
    return dist.get_rank(), dist.get_world_size(), float(t)


def _rank1_raises() -> int:
    if dist.get_rank() == 1:
        raise KeyError("rank one is broken")
    return dist.get_rank()


def _rank1_sleeps(seconds: float) -> int:
    if dist.get_rank() == 1:
        time.sleep(seconds)
    return dist.get_rank()


@pytest.fixture(scope="module")
def harness():
    h = DistributedHarness(2, timeout_s=60)
    yield h
    h.close()


def test_results_in_rank_order_with_kwargs(harness):
    assert harness.run(_rank_and_sum, offset=10) == [(0, 2, 21.0), (1, 2, 21.0)]
    assert harness.alive


def test_rank_error_carries_the_traceback_and_harness_recovers(harness):
    with pytest.raises(RankError) as info:
        harness.run(_rank1_raises)
    message = str(info.value)
    assert "_rank1_raises failed on ranks [1]" in message
    assert "--- rank 1 ---" in message and "Traceback" in message
    assert "KeyError: 'rank one is broken'" in message
    assert "--- rank 0 ---" not in message
    assert harness.run(_rank_and_sum, 0) == [(0, 2, 1.0), (1, 2, 1.0)]


def test_hang_becomes_a_timeout_and_harness_recovers(harness):
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        harness.run(_rank1_sleeps, 8.0, timeout_s=2)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "_rank1_sleeps did not finish on ranks [1]" in message and "no answer within 2s" in message
    assert elapsed < 12, elapsed  # the timeout plus tearing the ranks down
    assert not harness.alive
    assert harness.run(_rank_and_sum, 1) == [(0, 2, 3.0), (1, 2, 3.0)]


def test_invalid_world_size():
    with pytest.raises(ValueError, match="world_size must be at least 1, got 0"):
        DistributedHarness(0)
