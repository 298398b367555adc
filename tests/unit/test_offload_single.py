"""Offload in one process: the swap space, sub-groups, the engine with cpu/nvme tiers, bad input and IO faults."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import deepshard
from deepshard.offload import aio as aio_mod
from deepshard.offload.aio import AIOError
from deepshard.offload.swap import SwapSpace, region_offsets
from deepshard.testing.models import GPT, PRESETS
from deepshard.zero import fragments
from deepshard.zero.offload_optimizer import plan_sub_groups, probe_state_keys

LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for key in LAUNCHER_VARS:
        monkeypatch.delenv(key, raising=False)
    yield


# ---------------------------------------------------------------------- building blocks
def test_plan_sub_groups_respects_the_size_and_keeps_big_masters_whole():
    groups = plan_sub_groups([5, 5, 20, 3, 3, 3], 10)
    assert [g.members for g in groups] == [[0, 1], [2], [3, 4, 5]]
    assert [g.numel for g in groups] == [10, 20, 9]
    assert [g.members for g in plan_sub_groups([1, 2, 3], 0)] == [[0], [1], [2]]


def test_probe_state_keys():
    p = [torch.nn.Parameter(torch.zeros(3))]
    assert probe_state_keys(torch.optim.AdamW(p, fused=True)) == ["exp_avg", "exp_avg_sq"]
    assert probe_state_keys(torch.optim.Adam(p, amsgrad=True)) == ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    assert probe_state_keys(torch.optim.SGD(p, lr=0.1, momentum=0.9)) == ["momentum_buffer"]

    class Needy(torch.optim.SGD):
        def __init__(self, params: Any, must: int) -> None:
            super().__init__(params, lr=0.1)

    with pytest.raises(ValueError, match="optimizer offload needs to learn the state layout of Needy"):
        probe_state_keys(Needy(p, 1))


def test_swap_space_round_trip_regions_and_bounded_pool(tmp_path):
    space = SwapSpace(tmp_path, 1 << 20, buffer_bytes=3 * 4096, buffer_count=2, block_size=4096)
    regions = [("a", 100), ("b", 5000)]
    for key, n in regions:
        space.slot(key, n)
    assert region_offsets(regions) == [0, 4096]
    buf = space.take(8192 + 4096)
    buf[:100] = 7
    buf[4096 : 4096 + 5000] = 9
    space.write(regions, buf)
    space.flush()
    assert space.bytes_written == 4096 + 8192
    back = space.read(regions).wait()
    assert bool((back[:100] == 7).all()) and bool((back[4096 : 4096 + 5000] == 9).all())
    space.give(back)
    a, b = space.take(10), space.take(10)
    assert space.resident_bytes == 2 * 3 * 4096
    with pytest.raises(RuntimeError, match="all 2 NVMe staging buffers are in use"):
        space.take(10)
    space.give(a)
    space.give(b)
    with pytest.raises(ValueError, match="does not fit the NVMe staging buffers"):
        space.take(4 * 4096)
    space.close()
    assert not any(tmp_path.iterdir())  # files removed


def test_swap_space_surfaces_a_failed_write(tmp_path, monkeypatch):
    space = SwapSpace(tmp_path, 0, buffer_bytes=4096, buffer_count=1, block_size=4096)
    space.slot("x", 4096)

    def full_disk(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(aio_mod.os, "pwritev", full_disk)
    space.write([("x", 4096)], space.take(4096))
    with pytest.raises(AIOError, match="No space left on device"):
        space.take(4096)  # the next use of the pool reports the failed write
    monkeypatch.undo()
    space.close()


# ---------------------------------------------------------------------- the engine
def _config(zero: dict[str, Any], bf16: bool = False) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        "zero_optimization": {"stage3_param_persistence_threshold": 0, **zero},
        "bf16": {"enabled": bf16},
    }


def _engine(zero: dict[str, Any], bf16: bool = False) -> Any:
    torch.manual_seed(0)
    engine, _, _, _ = deepshard.initialize(model=GPT(PRESETS["tiny"]), config=_config(zero, bf16))
    return engine


def _train(engine: Any, steps: int, first: int = 0) -> list[float]:
    losses = []
    for step in range(first, first + steps):
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, 256, (2, 64), generator=g)
        loss = engine(x, torch.roll(x, -1, 1))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _nvme(path: Path, **extra: Any) -> dict[str, Any]:
    return {"device": "nvme", "nvme_path": str(path), **extra}


def _resident_bytes(engine: Any) -> int:
    """Bytes the masters and optimizer state hold in memory, measured on their storages."""
    seen: dict[int, int] = {}
    for m in engine.masters.masters:
        seen[m.untyped_storage().data_ptr()] = m.untyped_storage().nbytes()
    for state in engine.optimizer.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_single_process_offload_matches_no_offload_exactly(stage, tmp_path):
    ref = _train(_engine({"stage": stage}), 4)
    cpu = _train(_engine({"stage": stage, "offload_optimizer": {"device": "cpu"}}), 4)
    nvme = _engine(
        {
            "stage": stage,
            "sub_group_size": 20_000,
            "offload_optimizer": _nvme(tmp_path, pipeline_read=True, pipeline_write=True),
            **({"offload_param": _nvme(tmp_path, max_in_cpu=0)} if stage == 3 else {}),
        }
    )
    assert len(nvme.partition.offload.sub_groups) > 3
    got = _train(nvme, 4)
    assert cpu == ref  # the same fused AdamW, stepped sub-group by sub-group: bit-identical
    assert got == ref
    stats = nvme.offload_stats()
    assert stats["bytes_read"] > 0 and stats["bytes_written"] > 0


def test_memory_tiers_with_nvme(tmp_path):
    engine = _engine(
        {"stage": 3, "offload_optimizer": _nvme(tmp_path), "offload_param": _nvme(tmp_path, max_in_cpu=0)}, bf16=True
    )
    _train(engine, 2)
    numel = sum(p.numel() for p in engine.module.parameters())
    mem = engine.memory_breakdown()
    assert mem.master_weights == 0 and mem.optimizer_states == 0 and mem.parameters == 0
    nvme, cpu = mem.tiers["nvme"], mem.tiers["cpu"]
    assert nvme["master_weights"] == 4 * numel
    assert nvme["optimizer_states"] == 8 * numel
    assert nvme["parameters"] >= 2 * numel
    # what stays in memory: placeholders (a few bytes per tensor), measured on the storages
    resident = _resident_bytes(engine)
    assert resident < 0.01 * 12 * numel, resident
    assert cpu["master_weights"] + cpu["optimizer_states"] == resident
    assert cpu["parameters"] == 0  # every shard segment is back on disk between steps
    groups = engine.partition.stage3.groups
    assert all(g.segment.untyped_storage().nbytes() == 0 for g in groups)


def test_memory_tiers_with_cpu():
    engine = _engine({"stage": 2, "offload_optimizer": {"device": "cpu"}})
    _train(engine, 1)
    numel = sum(p.numel() for p in engine.module.parameters())
    mem = engine.memory_breakdown()
    assert mem.master_weights == 0 and mem.optimizer_states == 0
    assert mem.tiers["cpu"]["master_weights"] == 4 * numel
    assert mem.tiers["cpu"]["optimizer_states"] >= 8 * numel


def test_checkpoint_round_trip_with_nvme(tmp_path):
    zero = {"stage": 3, "offload_optimizer": _nvme(tmp_path / "a"), "offload_param": _nvme(tmp_path / "a", max_in_cpu=0)}
    (tmp_path / "a").mkdir()
    whole = _train(_engine({"stage": 3}), 6)
    first = _engine(zero)
    assert _train(first, 3) == whole[:3]
    first.save_checkpoint(str(tmp_path / "ckpt"))
    # resume with offload, and without (the checkpoint does not depend on the tier)
    for resumed_zero in (zero, {"stage": 3}):
        resumed = _engine(resumed_zero)
        resumed.load_checkpoint(str(tmp_path / "ckpt"))
        assert _train(resumed, 3, first=3) == whole[3:]


def test_fragment_api_reads_and_writes_through_the_tier(tmp_path):
    engine = _engine({"stage": 2, "offload_optimizer": _nvme(tmp_path)})
    _train(engine, 1)
    p = engine.module.blocks[0].qkv.weight
    master = fragments.safe_get_full_fp32_param(p)
    assert torch.equal(master, p.detach())
    avg = fragments.safe_get_full_optimizer_state(p, "exp_avg")
    assert avg is not None and avg.abs().sum() > 0
    fragments.safe_set_full_fp32_param(p, torch.zeros_like(master))
    assert bool((p == 0).all())  # the parameter follows at once
    assert bool((fragments.safe_get_full_fp32_param(p) == 0).all())  # and the master was written back


# ---------------------------------------------------------------------- bad input and faults
def test_missing_nvme_path_is_created_at_initialize(tmp_path):
    # DeepSpeed creates a missing nvme_path (issue #14); deepshard does too, parents included
    engine = _engine({"stage": 2, "offload_optimizer": _nvme(tmp_path / "nope" / "deeper")})
    assert (tmp_path / "nope" / "deeper").is_dir()
    engine.destroy()


def test_nvme_path_that_cannot_be_created_fails_at_initialize(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(
        ValueError, match=r"nvme_path '.*a_file/sub' for offload of fp32 masters .* does not exist and could not be "
        r"created \(Not a directory\)"
    ):
        _engine({"stage": 2, "offload_optimizer": _nvme(tmp_path / "a_file" / "sub")})


def test_unwritable_nvme_path_fails_at_initialize():
    assert not os.access("/proc/sys", os.W_OK)
    with pytest.raises(ValueError, match=r"nvme_path '/proc/sys' .* is not writable"):
        _engine({"stage": 3, "offload_param": _nvme(Path("/proc/sys"))})


def test_not_enough_space_fails_before_any_write(tmp_path, monkeypatch):
    real = shutil.disk_usage

    def tiny(path: Any) -> Any:
        return real(path)._replace(free=100_000)

    monkeypatch.setattr(aio_mod.shutil, "disk_usage", tiny)
    zero = {"stage": 3, "offload_optimizer": _nvme(tmp_path), "offload_param": _nvme(tmp_path)}
    with pytest.raises(ValueError) as info:
        _engine(zero)
    msg = str(info.value)
    assert "0.00 GiB free" in msg and "parameter shards + fp32 masters and Adam state" in msg, msg
    assert "free space there or point nvme_path at a larger disk" in msg
    assert not any(tmp_path.iterdir())  # nothing was written


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_io_error_mid_run_stops_the_step_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    (tmp_path / "swap").mkdir()
    engine = _engine({"stage": 2, "offload_optimizer": _nvme(tmp_path / "swap")})
    _train(engine, 2)
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    before = _tree_digest(tmp_path / "ckpt")
    real = aio_mod.os.pwritev
    calls = [0]

    def failing(fd: int, buffers: Any, offset: int) -> int:
        calls[0] += 1
        if calls[0] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, buffers, offset)

    monkeypatch.setattr(aio_mod.os, "pwritev", failing)
    with pytest.raises(AIOError, match=r"write of \d+ bytes at offset \d+ of .*sg\d+.* No space left on device"):
        _train(engine, 1, first=2)
    monkeypatch.undo()
    assert _tree_digest(tmp_path / "ckpt") == before
    # the last good checkpoint still loads and resumes
    resumed = _engine({"stage": 2})
    resumed.load_checkpoint(str(tmp_path / "ckpt"))
    assert resumed.global_steps == 2


def test_max_in_cpu_and_deep_prefetch_with_few_staging_buffers(tmp_path):
    # prefetch asks for every unit ahead, with only 2 staging buffers: it must wait, not fail
    ref = _train(_engine({"stage": 3}), 3)
    zero = {
        "stage": 3,
        "stage3_prefetch_bucket_size": 10**9,
        "stage3_max_reuse_distance": 0,
        "offload_param": _nvme(tmp_path, buffer_count=2, max_in_cpu=0),
    }
    engine = _engine(zero)
    assert engine.partition.param_swap.buffer_count == 2
    assert _train(engine, 3) == ref
    assert all(g.segment.untyped_storage().nbytes() == 0 for g in engine.partition.stage3.groups)
    # max_in_cpu: the first units (in model order) up to that many elements stay in host memory
    groups = _engine({**zero, "offload_param": _nvme(tmp_path, max_in_cpu=40_000)}).partition.stage3.groups
    kept = [g for g in groups if g.segment.untyped_storage().nbytes() > 0]
    assert kept and len(kept) < len(groups)
    assert sum(g.layout.segment_numel for g in kept) <= 40_000
