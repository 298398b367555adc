"""Offload runs executed on the harness's ranks (not a test module: pickled by reference)."""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from engine_runs import _config, _global_batches, build_model

import deepshard
from deepshard.testing.parity import rank_slice


def nvme(**extra: Any) -> dict[str, Any]:
    """An ``nvme`` offload section in this machine's temporary directory (each rank has its own files)."""
    return {"device": "nvme", "nvme_path": tempfile.gettempdir(), **extra}


def resident_and_tiers(zero: dict[str, Any]) -> dict[str, Any]:
    """Train 2 steps; measure what the masters, optimizer state and shards hold in memory (storages)."""
    rank, world = deepshard.comm.get_rank(), deepshard.comm.get_world_size()
    model = build_model(False, "odd")
    engine, _, _, _ = deepshard.initialize(
        model=model, config=_config(1, world, zero_optimization=zero, bf16={"enabled": True})
    )
    for micro_batches in _global_batches(world, 1, "odd")[:2]:
        x, y = rank_slice(micro_batches[0], rank, world)
        engine.backward(engine(x, y))
        engine.step()
    storages: dict[int, int] = {}
    for t in [*engine.masters.masters, *(v for s in engine.optimizer.state.values() for v in s.values())]:
        if isinstance(t, torch.Tensor):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    segments = sum(g.segment.untyped_storage().nbytes() for g in engine.partition.stage3.groups)
    mem = engine.memory_breakdown()
    rows = sum(m.numel() for m in engine.masters.masters)
    engine.destroy()
    return {"resident": sum(storages.values()), "segments": segments, "tiers": mem.tiers, "rows": rows, "mem": mem}
