"""All-gather updated parameter shards back into whole parameters (ZeRO stages 1 and 2).

After each rank steps the masters of its own dim-0 rows, every rank needs every parameter whole
again. Parameters are packed into buckets of at most ``allgather_bucket_size`` elements; per bucket
this rank casts its updated shards into its own segment of the rank-major buffer, one
``all_gather_into_tensor`` (in place) fills the other segments, and the other ranks' rows are copied
into the parameters. This rank's own rows go straight from the masters into the parameters (nothing
to do when the fp32 masters are views of the parameters' rows).

Two bucket buffers are kept across steps and alternate, so one bucket is on the wire while the
previous one is unpacked. Peak extra memory: two buckets, whole (a bucket holding one parameter
larger than ``allgather_bucket_size`` gets a buffer of its own while it is exchanged).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from deepshard import comm
from deepshard.comm.bucketing import plan_buckets
from deepshard.precision.master import MasterWeights, as_rows
from deepshard.zero.collectives import copy_out_rows, own_segment
from deepshard.zero.layout import BucketLayout, reusable_layouts


class ParamGatherer:
    """Buckets of parameters and the all-gather that rebuilds them from per-rank shards."""

    def __init__(
        self, params: Sequence[torch.Tensor], rank: int, world: int, bucket_elements: int, group: Any = None
    ) -> None:
        self.rank = rank
        self.world = world
        self.group = group
        self.params = list(params)
        self.buckets = [
            [self.params[i] for i in idx]
            for idx in plan_buckets([p.numel() for p in self.params], bucket_elements)
        ]
        self.layouts = [BucketLayout([p.shape for p in members], world) for members in self.buckets]
        self._buffers: list[torch.Tensor] = []
        self._buffer_numel = max(
            (lay.full_numel for lay in reusable_layouts(self.layouts, bucket_elements)), default=0
        )
        self._rows: list[list[list[torch.Tensor]]] = []
        self._ptrs: list[int] = []

    def _bind_rows(self) -> None:
        """Per bucket and rank, views of the parameters' rows (rebuilt if a parameter's storage moved)."""
        ptrs = [p.data_ptr() for p in self.params]
        if ptrs == self._ptrs:
            return
        self._ptrs = ptrs
        self._rows = []
        for members, layout in zip(self.buckets, self.layouts):
            per_rank = []
            for q in range(self.world):
                views = []
                for p, spec in zip(members, layout.specs):
                    start, end = spec.row_range(q)
                    views.append(as_rows(p.data)[start:end])
                per_rank.append(views)
            self._rows.append(per_rank)

    def _buffer(self, i: int, numel: int, like: torch.Tensor) -> torch.Tensor:
        """Kept buffer ``i`` (two alternate), or a transient one for an oversized bucket."""
        if numel > self._buffer_numel:
            return torch.empty(numel, dtype=like.dtype, device=like.device)
        while len(self._buffers) <= i:
            self._buffers.append(torch.empty(self._buffer_numel, dtype=like.dtype, device=like.device))
        return self._buffers[i][:numel]

    @torch.no_grad()
    def gather(self, masters: MasterWeights) -> None:
        """Write every rank's updated masters into the whole parameters on every rank."""
        self._bind_rows()
        own_needs_copy = masters.needs_fp32_copy and not masters.published_early
        if self.world == 1:
            if own_needs_copy and self.params:
                torch._foreach_copy_(
                    [r for per_rank in self._rows for r in per_rank[0]], masters.masters_of(self.params)
                )
            return
        pending: list[tuple[int, Any, torch.Tensor]] = []
        for b, (members, layout) in enumerate(zip(self.buckets, self.layouts)):
            if len(pending) == 2:  # this bucket reuses the buffer of the one two back
                self._unpack(*pending.pop(0))
            full = self._buffer(b % 2, layout.full_numel, members[0])
            segment = own_segment(layout, full, self.rank)
            # padding rows go over the wire but are never copied out, so they need no zeroing
            self._pack(b, masters, segment)
            work = comm.all_gather_into_tensor(full, segment, group=self.group, async_op=True)
            pending.append((b, work, full))
        for item in pending:
            self._unpack(*item)

    def _pack(self, b: int, masters: MasterWeights, segment: torch.Tensor) -> None:
        """Cast this rank's updated masters of bucket ``b`` into ``segment`` (and its own rows)."""
        members, layout = self.buckets[b], self.layouts[b]
        dst = [layout.segment_view(segment, slot, self.rank) for slot in range(len(members))]
        src = [masters.publish_source(p).reshape(d.shape) for p, d in zip(members, dst)]
        if dst:
            torch._foreach_copy_(dst, src)
        if (
            masters.needs_fp32_copy and not masters.published_early and dst
        ):  # own rows from the already-cast segment (cheaper than a second cast)
            torch._foreach_copy_(
                self._rows[b][self.rank], [d.view(r.shape) for d, r in zip(dst, self._rows[b][self.rank])]
            )

    def _unpack(self, b: int, work: Any, full: torch.Tensor) -> None:
        if work is not None:
            work.wait()
        copy_out_rows(self.layouts[b], full, self._rows[b], skip=self.rank)
