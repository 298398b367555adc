"""Stage-1 gradient reduction through shared memory, for the ranks of one host.

At ZeRO stage 1 each rank steps only its own dim-0 rows, so of the reduced gradient it needs only
those rows; an all-reduce hands every rank all of them. On one host the ranks can instead keep their
gradient buffers in one shared mapping (:func:`deepshard.comm.host_shm.shared_storage`, one region per
rank): backward accumulates into them exactly as the all-reduce reducer's buffers (``param.grad`` is
a view), and at the accumulation boundary, after a fence, each rank sums its own rows over all ranks'
regions into its own region. No bytes cross a socket; each rank reads ``Ψ`` elements and writes
``Ψ / N``, instead of moving ``2Ψ (N-1)/N`` through gloo's ring.

What the optimizer gets are this rank's rows (as at stage 2); the rest of its buffer holds its local,
unreduced gradients until the next ``zero()``. Conditions: one host, gloo, gradients in the
parameters' dtype (``param.grad`` is a buffer view); otherwise :func:`try_shared_row_reducer`
returns ``None`` and the all-reduce reducer is used. ``DEEPSHARD_HOST_SHM=0`` turns it off.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from deepshard import comm
from deepshard.comm.bucketing import FlatBuffer
from deepshard.comm.host_shm import PAGE, shared_regions, unmap_pages
from deepshard.offload.aio import align_up
from deepshard.precision.master import as_rows
from deepshard.zero.grad_reduce import AllReduceGradReducer, ReduceSpec

RowRange = Callable[[torch.Tensor], tuple[int, int]]


class SharedRowReducer(AllReduceGradReducer):
    """:class:`AllReduceGradReducer` whose buffers live in shared memory and whose result is own rows."""

    sharded_result = True

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        grad_dtype: torch.dtype,
        bucket_elements: int,
        spec: ReduceSpec,
        rank: int,
        row_range: RowRange,
        regions: list[torch.Tensor],
        group: Any = None,
    ) -> None:
        world = spec.world_size
        # every rank's region of the mapping; this rank's buffers are made in its own (no private copy)
        self._regions = [r.view(grad_dtype) for r in regions]
        self.rank = rank  # before the base class builds the buffers (in this rank's region)
        super().__init__(params, grad_dtype, bucket_elements, spec, group=group, overlap=False)
        # this rank's rows of each parameter, in its own region and in every other rank's (the per-step
        # lists leave out empty row ranges)
        self._param_rows: dict[int, torch.Tensor] = {}
        self._own: list[torch.Tensor] = []
        self._peers: list[list[torch.Tensor]] = [[] for q in range(world) if q != rank]
        start = 0
        for buf, bucket in zip(self.buffers, self.buckets):
            for p, o, shape in zip(bucket.params, buf.offsets, buf.shapes):
                lo, hi = row_range(p)
                rows = [
                    as_rows(r[start + o : start + o + shape.numel()].view(shape))[lo:hi]
                    for r in self._regions
                ]
                self._param_rows[id(p)] = rows[rank]
                if hi > lo:
                    self._own.append(rows[rank])
                    for peer, peer_rows in zip(self._peers, rows[:rank] + rows[rank + 1 :]):
                        peer.append(peer_rows)
            start += buf.numel

    def _make_buffers(self, grad_dtype: torch.dtype) -> list[FlatBuffer]:
        mine = self._regions[self.rank]  # zero-filled: a fresh shared mapping
        buffers, start = [], 0
        for bucket in self.buckets:
            buf = FlatBuffer([p.shape for p in bucket.params], grad_dtype, mine.device, flat=mine[start:])
            buffers.append(buf)
            start += buf.numel
        return buffers

    # per-bucket collectives are replaced by one reduction of own rows at the end of backward
    def _start(self, b: int) -> None:
        return None

    def _land(self, b: int) -> None:
        return None

    def finish(self) -> None:
        """At a reducing backward: fence, then sum this rank's rows over every rank's region."""
        if not self._reducing:
            return
        self._reducing = False
        comm.barrier(group=self.group)  # every rank's gradients are complete
        own = self._own
        if own:
            before = self.spec.before()
            if before != 1.0:
                torch._foreach_mul_(own, before)
            for peer in self._peers:
                torch._foreach_add_(own, peer, alpha=before)
            after = self.spec.after()
            if after != 1.0:
                torch._foreach_mul_(own, after)
        comm.barrier(group=self.group)  # nobody zeroes its region while another still reads it
        for q, region in enumerate(self._regions):
            if q != self.rank:
                unmap_pages(region)  # the others' regions were only read: do not keep them resident

    def optimizer_grads(self) -> dict[int, torch.Tensor]:
        """What the masters get as gradients: this rank's reduced rows (see :meth:`shard_grads`)."""
        return self.shard_grads()

    def shard_grads(self) -> dict[int, torch.Tensor]:
        """``id(param) -> this rank's reduced rows``."""
        return dict(self._param_rows)

    def flat_grads(self) -> list[torch.Tensor]:
        """This rank's reduced rows (the norm and clipping act on these only)."""
        return list(self._own)


def try_shared_row_reducer(
    params: Sequence[torch.nn.Parameter],
    grad_dtype: torch.dtype,
    bucket_elements: int,
    spec: ReduceSpec,
    rank: int,
    row_range: RowRange,
    group: Any = None,
    configured: bool = True,
) -> SharedRowReducer | None:
    """A :class:`SharedRowReducer` where the ranks share a host (collective), else ``None``."""
    if spec.world_size == 1:
        return None
    usable = all(p.device.type == "cpu" and p.dtype == grad_dtype for p in params)
    nbytes = sum(p.numel() for p in params) * torch.empty((), dtype=grad_dtype).element_size()
    # one page-aligned region per rank (see unmap_pages), each a whole number of pages
    regions = shared_regions(group, [align_up(nbytes, PAGE)] * spec.world_size, usable, PAGE, configured)
    if regions is None:
        return None
    return SharedRowReducer(params, grad_dtype, bucket_elements, spec, rank, row_range, regions, group)
