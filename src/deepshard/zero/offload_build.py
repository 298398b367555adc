"""Choose and build the offload tiers a config asks for: optimizer state and (stage 3) parameter shards.

``offload_optimizer.device`` / ``offload_param.device``: ``none`` keeps the state where the model is;
``cpu`` keeps it in host memory; ``nvme`` keeps it in swap files under ``nvme_path``, moved through
the ``aio`` engine. Before anything is written the free space under each ``nvme_path`` is checked
against what will go there (parameter shards, fp32 masters and Adam's two state tensors), so a run
that cannot fit fails at ``initialize`` with the sizes, not in the middle of a step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from deepshard.offload.aio import AsyncIO, check_nvme_path
from deepshard.offload.swap import SwapSpace
from deepshard.precision.master import as_rows
from deepshard.zero.layout import ShardSpec
from deepshard.zero.offload_optimizer import ADAM_LIKE_STATES as ADAM_STATES
from deepshard.zero.offload_optimizer import OffloadedOptimizer


def tier_of(section: Any) -> str:
    """``none``, ``cpu`` or ``nvme`` for an ``offload_optimizer`` / ``offload_param`` section (or ``None``)."""
    return "none" if section is None else str(section.device)


def master_numels(
    params: Sequence[torch.Tensor], rank: int, world: int, sharded: bool, shards: dict[int, torch.Tensor] | None = None
) -> list[int]:
    """Elements of the master :class:`MasterWeights` will make for each parameter on this rank."""
    out = []
    for p in params:
        if shards and id(p) in shards:
            out.append(shards[id(p)].numel())
        elif not sharded:
            out.append(p.numel())
        else:
            rows = as_rows(p.detach()) if p.dim() == 0 else p
            start, end = ShardSpec(rows.shape, world).row_range(rank)
            row_numel = rows[0].numel() if rows.shape[0] else 0
            out.append((end - start) * row_numel)
    return out


def check_space(zero_cfg: Any, param_bytes: int, master_numel: int) -> None:
    """Check every ``nvme_path`` for the bytes this rank will put there (all tiers sharing a disk counted once)."""
    needs: dict[str, tuple[str, int]] = {}

    def add(section: Any, nbytes: int, what: str) -> None:
        if tier_of(section) != "nvme" or nbytes <= 0:
            return
        key = os.path.realpath(section.nvme_path)
        prev_what, prev = needs.get(key, ("", 0))
        needs[key] = (f"{prev_what} + {what}" if prev_what else what, prev + nbytes)

    add(zero_cfg.offload_param, param_bytes, "parameter shards")
    add(zero_cfg.offload_optimizer, master_numel * 4 * (1 + ADAM_STATES), "fp32 masters and Adam state")
    for path, (what, nbytes) in needs.items():
        check_nvme_path(path, nbytes, what=f"offload of {what} on this rank")


def _aio_kwargs(aio: Any) -> dict[str, Any]:
    if aio is None:
        return {}
    return {
        "block_size": int(aio.block_size),
        "queue_depth": int(aio.queue_depth),
        "thread_count": int(aio.intra_op_parallelism),
    }


def optimizer_offload(
    zero_cfg: Any, aio: Any, numels: Sequence[int], engine: AsyncIO | None = None
) -> OffloadedOptimizer | None:
    """The optimizer's offload tier for masters of ``numels`` elements, or ``None`` without offload
    (``engine``: the parameters' IO engine, shared so that the disk sees one queue)."""
    section = zero_cfg.offload_optimizer
    tier = tier_of(section)
    if tier == "none":
        return None
    size = int(zero_cfg.sub_group_size)
    swap = None
    if tier == "nvme":
        # a sub-group is read, stepped and written: one buffer, plus one ahead / one behind when pipelined
        count = max(int(section.buffer_count), 1 + int(section.pipeline_read) + int(section.pipeline_write))
        swap = SwapSpace(
            section.nvme_path,
            sum(numels) * 4 * (1 + ADAM_STATES),
            OffloadedOptimizer.buffer_bytes(numels, size, ADAM_STATES),
            count,
            what="optimizer offload",
            engine=engine,
            **_aio_kwargs(aio),
        )
    return OffloadedOptimizer(
        numels, tier, size, swap, pipeline_read=bool(section.pipeline_read), pipeline_write=bool(section.pipeline_write)
    )


def param_swap(zero_cfg: Any, aio: Any, segment_bytes: Sequence[int]) -> SwapSpace | None:
    """Swap space for ZeRO-3 parameter shards when ``offload_param.device`` is ``nvme``."""
    section = zero_cfg.offload_param
    if tier_of(section) != "nvme" or not segment_bytes:
        return None
    # one transfer is one unit's shard segment, so a buffer is sized to the largest (DeepSpeed sizes
    # its buffers by offload_param.buffer_size instead, which must then exceed the largest parameter)
    return SwapSpace(
        section.nvme_path,
        sum(segment_bytes),
        max(segment_bytes),
        max(int(section.buffer_count), 2),
        what="parameter offload",
        **_aio_kwargs(aio),
    )
