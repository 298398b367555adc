"""All-gather updated parameter shards back into whole parameters (ZeRO stages 1 and 2).

After each rank steps the masters of its own dim-0 rows, every rank needs every parameter whole
again. Parameters are packed into buckets of at most ``allgather_bucket_size`` elements; per bucket
this rank casts its updated shards into one segment, a single ``all_gather_into_tensor`` fills the
rank-major buffer, and each parameter copies its rows out. Peak extra memory: one bucket, whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from deepshard import comm
from deepshard.comm.bucketing import plan_buckets
from deepshard.precision.master import MasterWeights
from deepshard.zero.layout import BucketLayout


class ParamGatherer:
    """Buckets of parameters and the all-gather that rebuilds them from per-rank shards."""

    def __init__(
        self, params: Sequence[torch.Tensor], rank: int, world: int, bucket_elements: int, group: Any = None
    ) -> None:
        self.rank = rank
        self.world = world
        self.group = group
        self.params = list(params)
        self.buckets = [[self.params[i] for i in idx] for idx in plan_buckets([p.numel() for p in self.params], bucket_elements)]
        self.layouts = [BucketLayout([p.shape for p in members], world) for members in self.buckets]

    @torch.no_grad()
    def gather(self, masters: MasterWeights) -> None:
        """Write every rank's updated masters into the whole parameters on every rank."""
        for members, layout in zip(self.buckets, self.layouts):
            dtype, device = members[0].dtype, members[0].device
            # padding rows go over the wire but are never copied out, so they need no zeroing
            segment = torch.empty(layout.segment_numel, dtype=dtype, device=device)
            for slot, p in enumerate(members):
                layout.segment_view(segment, slot, self.rank).copy_(masters.master_of(p).reshape(layout.specs[slot].local_shape(self.rank)))
            if self.world == 1:
                full = segment
            else:
                full = torch.empty(layout.full_numel, dtype=dtype, device=device)
                comm.all_gather_into_tensor(full, segment, group=self.group)
            for slot, p in enumerate(members):
                layout.gather_full(full, slot, p.data)
