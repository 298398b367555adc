"""The device abstraction on a CPU machine (``deepshard.accelerator``)."""

from __future__ import annotations

import pytest
import torch

from deepshard import accelerator as acc
from deepshard.accelerator import CpuAccelerator, get_accelerator, set_accelerator


@pytest.fixture
def fresh(monkeypatch):
    """Forget the cached accelerator for the test, and restore it afterwards."""
    monkeypatch.setattr(acc, "_ACCELERATOR", None)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    monkeypatch.delenv("DEEPSHARD_ACCELERATOR", raising=False)
    return monkeypatch


def test_cpu_accelerator_basics(monkeypatch):
    cpu = CpuAccelerator()
    assert cpu.name == "cpu" and cpu.is_available()
    assert cpu.device_name() == cpu.device_name(3) == "cpu"
    assert cpu.device() == torch.device("cpu")
    assert cpu.current_device() == 0 and cpu.current_device_name() == "cpu"
    assert cpu.communication_backend_name() == "gloo"
    assert cpu.is_bf16_supported() and cpu.is_fp16_supported()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert cpu.device_count() == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert cpu.device_count() == 1


def test_cpu_streams_and_pinning_are_no_ops():
    cpu = CpuAccelerator()
    assert cpu.new_stream() is None
    with cpu.stream(cpu.new_stream()):
        pass
    t = torch.ones(3)
    assert cpu.pin_memory(t) is t
    cpu.synchronize()
    cpu.empty_cache()
    cpu.set_device(0)


def test_cpu_memory_queries():
    cpu = CpuAccelerator()
    now = cpu.memory_allocated()
    assert now > 0
    assert cpu.max_memory_allocated() >= now // 2  # peak RSS (kB resolution) is not below current RSS
    assert cpu.on_accelerator(torch.zeros(1))


def test_manual_seed_is_deterministic():
    cpu = CpuAccelerator()
    cpu.manual_seed(7)
    a = torch.rand(3)
    cpu.manual_seed(7)
    assert torch.equal(a, torch.rand(3))


def test_get_accelerator_is_cached_and_overridable(fresh):
    first = get_accelerator()
    assert first is get_accelerator()
    assert first.name == ("cuda" if torch.cuda.is_available() else "cpu")
    mine = CpuAccelerator()
    set_accelerator(mine)
    assert get_accelerator() is mine


def test_ds_accelerator_cpu(fresh):
    fresh.setenv("DS_ACCELERATOR", "CPU")
    assert get_accelerator().name == "cpu"


def test_ds_accelerator_unknown_kind(fresh):
    fresh.setenv("DS_ACCELERATOR", "xpu")
    with pytest.raises(ValueError) as info:
        get_accelerator()
    message = str(info.value)
    assert "DS_ACCELERATOR='xpu'" in message and "'cpu' or 'cuda'" in message and "unset" in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised on a machine without CUDA")
def test_ds_accelerator_cuda_without_cuda(fresh):
    fresh.setenv("DS_ACCELERATOR", "cuda")
    with pytest.raises(ValueError, match="no CUDA device is available; unset it or use 'cpu'"):
        get_accelerator()
