"""Measured matmul throughput per dtype and the slow-half-precision warning at initialize."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch

import deepshard
from deepshard.precision import throughput


@pytest.fixture
def warnings_logged() -> Iterator[list[str]]:
    """Warnings logged under ``deepshard`` (the project's logger does not propagate to caplog)."""
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    log = logging.getLogger("deepshard")
    log.addHandler(handler)
    yield seen
    log.removeHandler(handler)


def test_measured_throughput_is_positive_and_cached():
    first = throughput.matmul_gflops(torch.float32, "cpu", 64, 0.01)
    assert first > 0
    assert throughput.matmul_gflops(torch.float32, "cpu", 64, 0.01) == first  # one measurement per process


def test_decision_follows_the_real_measurement(warnings_logged):
    half, fp32 = throughput.half_precision_slowdown(torch.bfloat16)
    warned = throughput.warn_if_half_precision_is_slow(torch.bfloat16)
    assert warned == (half * throughput.SLOW_FACTOR < fp32)
    assert len(warnings_logged) == int(warned)


def test_slow_half_precision_warns_with_both_figures_and_the_fix(monkeypatch, warnings_logged):
    monkeypatch.setattr(throughput, "half_precision_slowdown", lambda dtype, device="cpu": (0.9, 62.5))
    assert throughput.warn_if_half_precision_is_slow(torch.bfloat16)
    (message,) = warnings_logged
    assert "0.9 GFLOP/s against 62.5 GFLOP/s in fp32" in message
    assert "about 69x slower" in message and '"bf16": {"enabled": false}' in message


def test_fast_half_precision_fp32_and_gpus_do_not_warn(monkeypatch, warnings_logged):
    monkeypatch.setattr(throughput, "half_precision_slowdown", lambda dtype, device="cpu": (400.0, 100.0))
    assert not throughput.warn_if_half_precision_is_slow(torch.bfloat16)
    monkeypatch.setattr(throughput, "half_precision_slowdown", lambda dtype, device="cpu": (1.0, 100.0))
    assert not throughput.warn_if_half_precision_is_slow(torch.float32)
    assert not throughput.warn_if_half_precision_is_slow(torch.float16, "cuda")  # not measured on GPUs
    assert warnings_logged == []


@pytest.mark.parametrize("section", ["bf16", "fp16"])
def test_initialize_warns_once_for_slow_half_precision(section, monkeypatch, warnings_logged):
    monkeypatch.setattr(throughput, "half_precision_slowdown", lambda dtype, device="cpu": (1.2, 98.0))
    config = {"train_micro_batch_size_per_gpu": 1, section: {"enabled": True},
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}}}  # fmt: skip
    deepshard.initialize(model=torch.nn.Linear(4, 4), config=config)
    slow = [m for m in warnings_logged if "GFLOP/s" in m]
    assert len(slow) == 1 and f"computes {section} matmuls at 1.2 GFLOP/s against 98.0" in slow[0]
    warnings_logged.clear()
    deepshard.initialize(model=torch.nn.Linear(4, 4), config={**config, section: {"enabled": False}})
    assert [m for m in warnings_logged if "GFLOP/s" in m] == []
