"""Collectives issued on the harness's ranks with the comms logger on (pickled by reference)."""

from __future__ import annotations

from typing import Any

import torch

import deepshard
from deepshard import comm
from deepshard.comm.comms_log import comms_logger

ISSUED = {
    "all_reduce": 3,
    "all_gather_into_tensor": 2,
    "reduce_scatter_tensor": 1,
    "broadcast": 4,
    "barrier": 1,
}


def issue_collectives(prof_ops: list[str] | None = None) -> dict[str, Any]:
    """Issue :data:`ISSUED` through deepshard.comm with the logger on; return what it recorded."""
    world = comm.get_world_size()
    comms_logger.reset_data()
    if prof_ops is None:
        comm.configure(enabled=True, prof_all=True, prof_ops=[])
    else:
        comm.configure(enabled=True, prof_all=False, prof_ops=prof_ops)
    try:
        x = torch.ones(1000)  # 4000 bytes
        for _ in range(ISSUED["all_reduce"]):
            comm.all_reduce(x)
        shard = torch.ones(250)  # 1000 bytes in, 1000 * world out
        for _ in range(ISSUED["all_gather_into_tensor"]):
            comm.all_gather_into_tensor(torch.empty(250 * world), shard)
        comm.reduce_scatter_tensor(torch.empty(500), torch.ones(500 * world))
        work = [comm.broadcast(torch.ones(10), src=0, async_op=True) for _ in range(ISSUED["broadcast"])]
        for w in work:
            w.wait()
        comm.barrier()
        data = comms_logger.get_raw_data()
        summary = comm.log_summary(return_dict=True)
    finally:
        comm.configure(enabled=False)
    after_off = comms_logger.get_total_operations()
    comm.all_reduce(torch.ones(3))  # off: not recorded
    return {
        "data": {k: {s: v[0] for s, v in sizes.items()} for k, sizes in data.items()},
        "ratios": {
            k: [b / a if a else 0.0 for a, b in zip(v[2], v[3])]
            for k, sizes in data.items()
            for v in sizes.values()
        },
        "latencies_positive": all(lat > 0 for sizes in data.values() for v in sizes.values() for lat in v[1]),
        "summary": summary,
        "total_after": comms_logger.get_total_operations() - after_off,
    }


def engine_with_comms_logger(stage: int) -> dict[str, Any]:
    """Two steps of the tiny GPT with ``comms_logger`` on; the recorded collective names and counts."""
    from monitor_runs import train_tiny

    comms_logger.reset_data()
    train_tiny({"comms_logger": {"enabled": True}, "zero_optimization": {"stage": stage}}, steps=2, world=2)
    counts = {k: sum(v[0] for v in sizes.values()) for k, sizes in comms_logger.get_raw_data().items()}
    comms_logger.reset_data()
    return {"counts": counts, "installed_after_destroy": comm._observer is not None}


__all__ = ["ISSUED", "deepshard", "engine_with_comms_logger", "issue_collectives"]
