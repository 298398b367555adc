"""Whole values of parameters that ``zero.Init`` partitioned, before an engine adopts them.

After ``with zero.Init(): model = ...`` and before ``deepshard.initialize``, a partitioned parameter
shows a placeholder of its real shape and keeps this rank's dim-0 rows aside (see
:mod:`deepshard.zero.init`). Code written for DeepSpeed gathers such parameters with
``GatheredParameters`` to read or fill them: the Hugging Face loader does exactly that under ZeRO-3,
one module at a time, with ``modifier_rank=0`` (rank 0 copies the checkpoint in; every rank keeps its
rows of what rank 0 wrote). This module is that path; once an engine owns the parameters,
:class:`~deepshard.zero.gathered.GatheredParameters` goes through the engine's shard groups instead.
"""

from __future__ import annotations

from typing import Any

import torch

from deepshard import comm
from deepshard.precision.master import as_rows
from deepshard.zero.collectives import gather_whole
from deepshard.zero.layout import ShardSpec
from deepshard.zero.rows import LOCAL_ROWS, ParamRegistry

INIT_GROUPS: ParamRegistry[Any] = ParamRegistry("the process group zero.Init split each parameter over")


def remember(param: torch.Tensor, group: Any) -> None:
    """Record the group ``zero.Init`` partitioned ``param`` over (called when the context exits)."""
    INIT_GROUPS.set(param, group)


def init_group(param: torch.Tensor) -> tuple[bool, Any]:
    """``(True, group)`` for a parameter partitioned by ``zero.Init`` and not yet adopted by an engine."""
    if param not in INIT_GROUPS or param not in LOCAL_ROWS:
        return False, None
    return True, INIT_GROUPS.get(param)


class InitGather:
    """Gather ``params`` (all ``zero.Init``-partitioned, one group) into whole tensors; scatter back on exit."""

    def __init__(self, params: list[torch.Tensor], group: Any) -> None:
        self.params = params
        self.group = group
        self.world = comm.get_world_size(group)
        self.placeholders: list[torch.Tensor] = []

    @torch.no_grad()
    def gather(self) -> None:
        """Collective: every parameter shows its whole value (rows of all ranks)."""
        for p in self.params:
            rows = LOCAL_ROWS.get(p)
            assert rows is not None
            self.placeholders.append(p.data)
            p.data = gather_whole(rows, p.shape, self.world, self.group, dtype=None)

    @torch.no_grad()
    def release(self, modifier_rank: int | None) -> None:
        """Back to placeholders; with ``modifier_rank``, that rank's values become every rank's rows."""
        rank = comm.get_rank(self.group)
        for p, placeholder in zip(self.params, self.placeholders):
            full = p.data
            if modifier_rank is not None:
                comm.broadcast(full, src=comm.get_global_rank(self.group, modifier_rank), group=self.group)
                rows = LOCAL_ROWS.get(p)
                assert rows is not None
                start, end = ShardSpec(p.shape, self.world).row_range(rank)
                rows.copy_(as_rows(full)[start:end].reshape(rows.shape))
            p.data = placeholder
        self.placeholders = []
