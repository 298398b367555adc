"""Gradient reduction across the data-parallel group, bucketed and launched from backward hooks.

Each trainable parameter belongs to one *bucket*; buckets follow the reverse of registration order,
which approximates the order backward produces gradients, so early buckets communicate while
backward is still running. Buckets are launched strictly in index order on every rank (a bucket
waits for its predecessors), so all ranks issue the same collectives in the same order even when a
parameter gets no gradient on some rank.

Two reducers share that machinery and differ in what they keep:

* :class:`AllReduceGradReducer` (stages 0 and 1) keeps whole gradients in persistent flat buffers and
  all-reduces them at accumulation boundaries. When the gradient dtype equals the parameter dtype,
  ``param.grad`` *is* the bucket view (no copy, as DDP's ``gradient_as_bucket_view``); otherwise a
  hook adds each fresh gradient into the buffer and frees it (bf16 params, fp32 accumulation).
* :class:`ReduceScatterGradReducer` (stage 2) keeps only this rank's gradient shards. A hook copies
  each fresh gradient into its bucket's rank-major buffer (see :mod:`deepshard.zero.layout`) and frees
  it; a full bucket is reduce-scattered and its buffer returns to a small pool, so whole gradients
  never outlive their reduction. As in DeepSpeed it reduces after every micro-step; inside ``no_sync`` buffers keep
  accumulating and are reduced once by the next synchronised backward.

Trade-off: smaller buckets overlap more of backward but issue more collectives. With
``overlap_comm=False`` each bucket's collective is waited for as soon as it is launched (DeepSpeed's
meaning: no communication runs concurrently with backward).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deepshard import comm
from deepshard.comm.bucketing import FlatBuffer, plan_buckets
from deepshard.zero.layout import BucketLayout, reusable_layouts


@dataclass(frozen=True)
class ReduceSpec:
    """How gradients are averaged across the data-parallel group (DeepSpeed's semantics).

    ``prescale``: divide by the world size before the sum (``prescale_gradients``); otherwise divide by
    ``predivide_factor`` before and by ``world_size / predivide_factor`` after
    (``gradient_predivide_factor``). ``reduce_dtype`` is the dtype on the wire
    (``communication_data_type``).
    """

    world_size: int
    reduce_dtype: torch.dtype
    prescale: bool = False
    predivide_factor: float = 1.0

    def before(self) -> float:
        """Factor applied to local gradients before the sum."""
        return 1.0 / self.world_size if self.prescale else 1.0 / self.predivide_factor

    def after(self) -> float:
        """Factor applied to the summed gradients."""
        return 1.0 if self.prescale else self.predivide_factor / self.world_size


def unique_trainable(params: Sequence[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Parameters that need gradients, each once (tied weights appear once), in order."""
    seen: set[int] = set()
    out = []
    for p in params:
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


class _Bucket:
    """Members of one bucket and the state of its in-flight collective."""

    def __init__(self, params: list[torch.nn.Parameter]) -> None:
        self.params = params
        self.pending = len(params)
        self.work: Any = None
        self.wire: torch.Tensor | None = None  # the tensor on the wire (a cast copy when dtypes differ)
        self.out: torch.Tensor | None = None  # reduce-scatter output


class _BucketedReducer(abc.ABC):
    """Hook registration, bucket order and launch discipline shared by both reducers."""

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        grad_dtype: torch.dtype,
        bucket_elements: int,
        spec: ReduceSpec,
        group: Any,
        overlap: bool,
        buckets: Sequence[Sequence[torch.nn.Parameter]] | None = None,
    ) -> None:
        ordered = list(reversed(unique_trainable(params)))
        self.overlap = overlap
        self.grad_dtype = grad_dtype
        self.spec = spec
        self.group = group
        if buckets is not None:  # given (ZeRO-3: one bucket per unit, in backward order)
            self.buckets = [_Bucket(list(members)) for members in buckets if members]
            ordered = [p for b in self.buckets for p in b.params]
        else:
            self.buckets = [
                _Bucket([ordered[i] for i in idx])
                for idx in plan_buckets([p.numel() for p in ordered], bucket_elements)
            ]
        self._where: dict[int, tuple[int, int]] = {}
        for b, bucket in enumerate(self.buckets):
            for slot, p in enumerate(bucket.params):
                self._where[id(p)] = (b, slot)
        self._reducing = False
        self._next_launch = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in ordered]

    # subclasses: what a fresh gradient does, how a bucket goes on the wire, how it lands
    @abc.abstractmethod
    def _absorb(self, b: int, slot: int, param: torch.Tensor) -> None:
        """Take ``param.grad`` (just accumulated) into bucket ``b``'s buffer at ``slot``."""

    @abc.abstractmethod
    def _start(self, b: int) -> None:
        """Launch bucket ``b``'s collective."""

    @abc.abstractmethod
    def _land(self, b: int) -> None:
        """Wait for bucket ``b``'s collective and average its result (idempotent)."""

    def begin_backward(self, reduce: bool) -> None:
        """Arm the hooks for one backward; ``reduce``: launch collectives as buckets fill."""
        self._reducing = reduce
        self._next_launch = 0
        for bucket in self.buckets:
            bucket.pending = len(bucket.params)

    def _on_grad(self, param: torch.Tensor) -> None:
        b, slot = self._where[id(param)]
        self._absorb(b, slot, param)
        if self._reducing:
            self.buckets[b].pending -= 1
            while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].pending <= 0:
                self._start(self._next_launch)
                if not self.overlap:
                    self._land(self._next_launch)
                self._next_launch += 1

    def finish(self) -> None:
        """Launch buckets that never filled (unused parameters), wait for all, and average."""
        if not self._reducing:
            return
        while self._next_launch < len(self.buckets):
            self._start(self._next_launch)
            self._next_launch += 1
        for b in range(len(self.buckets)):
            self._land(b)
        self._reducing = False

    def _wire(self, full: torch.Tensor) -> torch.Tensor:
        wire = full if full.dtype == self.spec.reduce_dtype else full.to(self.spec.reduce_dtype)
        before = self.spec.before()
        if before != 1.0:
            wire.mul_(before)
        return wire

    def remove_hooks(self) -> None:
        """Detach from the parameters (the engine is being torn down)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()


class AllReduceGradReducer(_BucketedReducer):
    """Whole gradients in persistent flat buffers, all-reduced at boundaries (stages 0 and 1)."""

    reduces_every_micro_step = False
    sharded_result = False  # what the optimizer gets: whole gradients

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        grad_dtype: torch.dtype,
        bucket_elements: int,
        spec: ReduceSpec,
        group: Any = None,
        overlap: bool = True,
    ) -> None:
        super().__init__(params, grad_dtype, bucket_elements, spec, group, overlap)
        self.buffers = self._make_buffers(grad_dtype)
        self.in_place = all(p.dtype == grad_dtype for b in self.buckets for p in b.params)
        self._bind_views()

    def _make_buffers(self, grad_dtype: torch.dtype) -> list[FlatBuffer]:
        """One flat gradient buffer per bucket (subclasses may place them elsewhere)."""
        return [FlatBuffer([p.shape for p in b.params], grad_dtype, b.params[0].device) for b in self.buckets]

    def _bind_views(self) -> None:
        """Point ``param.grad`` at its bucket view (in-place mode), keeping any gradient already there."""
        if not self.in_place:
            return
        for bucket, buffer in zip(self.buckets, self.buffers):
            for p, view in zip(bucket.params, buffer.views):
                if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                    if p.grad is not None:
                        view.copy_(p.grad)
                    p.grad = view

    def begin_backward(self, reduce: bool) -> None:
        self._bind_views()
        super().begin_backward(reduce)

    def _absorb(self, b: int, slot: int, param: torch.Tensor) -> None:
        if not self.in_place:
            assert param.grad is not None
            self.buffers[b].views[slot].add_(param.grad)
            param.grad = None

    def _start(self, b: int) -> None:
        bucket = self.buckets[b]
        if self.spec.world_size == 1:
            return
        bucket.wire = self._wire(self.buffers[b].flat)
        bucket.work = comm.all_reduce(bucket.wire, group=self.group, async_op=True)

    def _land(self, b: int) -> None:
        bucket = self.buckets[b]
        if bucket.work is None or bucket.wire is None:
            return
        bucket.work.wait()
        after = self.spec.after()
        if after != 1.0:
            bucket.wire.mul_(after)
        if bucket.wire is not self.buffers[b].flat:
            self.buffers[b].flat.copy_(bucket.wire)
        bucket.work = bucket.wire = None

    def optimizer_grads(self) -> dict[int, torch.Tensor]:
        """What the masters get as gradients: here the whole ones (see :meth:`full_grads`)."""
        return self.full_grads()

    def full_grads(self) -> dict[int, torch.Tensor]:
        """``id(param) -> whole gradient`` for every parameter this reducer owns."""
        return {
            id(p): v
            for bucket, buf in zip(self.buckets, self.buffers)
            for p, v in zip(bucket.params, buf.views)
        }

    def flat_grads(self) -> list[torch.Tensor]:
        """The flat gradient tensors, one per bucket."""
        return [buf.flat for buf in self.buffers]

    def zero(self) -> None:
        """Clear all gradients (in place, so ``param.grad`` views stay bound)."""
        for buf in self.buffers:
            buf.flat.zero_()
        self._bind_views()

    @property
    def nbytes(self) -> int:
        """Bytes held by the gradient buffers."""
        return sum(buf.nbytes for buf in self.buffers)


class _Slot:
    """One set of bucket-size communication buffers: the rank-major input, the all-to-all scratch
    (host/gloo only) and this rank's reduced chunk."""

    def __init__(
        self,
        numel: int,
        segment_numel: int,
        dtype: torch.dtype,
        device: torch.device,
        scratch: bool,
        pooled: bool,
    ) -> None:
        self.full = torch.empty(numel, dtype=dtype, device=device)
        self.scratch = torch.empty(numel, dtype=dtype, device=device) if scratch else None
        self.out = torch.empty(segment_numel, dtype=dtype, device=device)
        self.pooled = pooled  # kept by the pool after use (else dropped)


class ReduceScatterGradReducer(_BucketedReducer):
    """Only this rank's gradient shards persist; buckets are reduce-scattered into them (stage 2).

    Fresh gradients are copied into a bucket-size communication buffer (DeepSpeed's
    ``contiguous_gradients``) and freed at once. Buffers come from a small pool that is kept across
    steps: two sets with ``overlap_comm`` (one fills while the other is on the wire), one without.
    When every pooled set is busy, the oldest in-flight bucket is landed to free one; only when none is
    in flight (several buckets filling at once, or ``no_sync``) is an extra set allocated, and it is
    dropped after use. So the memory beyond the shards is bounded by the bucket size, not the model.
    """

    reduces_every_micro_step = True
    sharded_result = True  # what the optimizer gets: this rank's rows

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        grad_dtype: torch.dtype,
        bucket_elements: int,
        spec: ReduceSpec,
        rank: int,
        group: Any = None,
        overlap: bool = True,
        buckets: Sequence[Sequence[torch.nn.Parameter]] | None = None,
    ) -> None:
        super().__init__(params, grad_dtype, bucket_elements, spec, group, overlap, buckets)
        self.rank = rank
        self.layouts = [BucketLayout([p.shape for p in b.params], spec.world_size) for b in self.buckets]
        device = self.buckets[0].params[0].device if self.buckets else torch.device("cpu")
        self.device = device
        self.shards = [
            torch.zeros(layout.segment_numel, dtype=grad_dtype, device=device) for layout in self.layouts
        ]
        fitting = reusable_layouts(self.layouts, bucket_elements)
        self._slot_numel = max((layout.full_numel for layout in fitting), default=0)
        self._slot_segment = max((layout.segment_numel for layout in fitting), default=0)
        probe = torch.empty(0, dtype=spec.reduce_dtype, device=device)
        self._scratch = spec.world_size > 1 and comm.reduce_scatter_needs_scratch(probe, group)
        self._keep = 2 if overlap else 1
        self._free: list[_Slot] = []
        self._kept = 0  # slots owned by the pool (free or lent)
        self._slots: list[_Slot | None] = [None] * len(self.buckets)
        self._written: list[list[bool]] = [[False] * len(b.params) for b in self.buckets]
        self._in_flight: list[int] = []
        self._stale = [False] * len(self.buckets)  # shard holds cleared values not yet overwritten

    # ---------------------------------------------------------------- buffer pool
    def _acquire(self, b: int) -> _Slot:
        layout = self.layouts[b]
        if layout.full_numel > self._slot_numel:  # oversized bucket: a transient set, dropped after use
            return _Slot(
                layout.full_numel, layout.segment_numel, self.grad_dtype, self.device, self._scratch, False
            )
        while not self._free and self._kept >= self._keep and self._in_flight:
            self._land(self._in_flight[0])  # frees the oldest bucket's set
        if self._free:
            return self._free.pop()
        pooled = self._kept < self._keep
        self._kept += int(pooled)
        return _Slot(
            self._slot_numel, self._slot_segment, self.grad_dtype, self.device, self._scratch, pooled
        )

    def _release(self, slot: _Slot) -> None:
        if slot.pooled:
            self._free.append(slot)

    def _full_view(self, b: int) -> torch.Tensor:
        slot = self._slots[b]
        if slot is None:
            slot = self._acquire(b)
            self._slots[b] = slot
        return slot.full[: self.layouts[b].full_numel]

    # ---------------------------------------------------------------- reducer hooks
    def _absorb(self, b: int, slot: int, param: torch.Tensor) -> None:
        assert param.grad is not None
        full = self._full_view(b)
        self.layouts[b].scatter_full(full, slot, param.grad, accumulate=self._written[b][slot])
        self._written[b][slot] = True
        param.grad = None

    def _start(self, b: int) -> None:
        layout, written = self.layouts[b], self._written[b]
        full = self._full_view(b)
        for index, seen in enumerate(written):
            if not seen:  # no gradient on this rank: contribute zeros
                layout.zero_member(full, index)
        if layout.padded:
            layout.zero_padding(full)
        self._written[b] = [False] * len(written)
        bucket, slot = self.buckets[b], self._slots[b]
        assert slot is not None
        bucket.wire = self._wire(full)
        if self.spec.world_size == 1:
            bucket.out = bucket.wire
        else:
            bucket.out = (
                slot.out[: layout.segment_numel]
                if bucket.wire.dtype == slot.out.dtype
                else torch.empty(layout.segment_numel, dtype=bucket.wire.dtype, device=full.device)
            )
            scratch = slot.scratch if bucket.wire.dtype == self.grad_dtype else None
            bucket.work = comm.reduce_scatter_tensor(
                bucket.out, bucket.wire, group=self.group, async_op=True, scratch=scratch
            )
        self._in_flight.append(b)

    def _land(self, b: int) -> None:
        bucket = self.buckets[b]
        if bucket.out is None:
            return
        if bucket.work is not None:
            bucket.work.wait()
        out = bucket.out
        after = self.spec.after()
        if after != 1.0:
            out.mul_(after)
        if self._stale[b]:  # first reduction since zero(): overwrite instead of zero-then-add
            self.shards[b].copy_(out)
            self._stale[b] = False
        else:
            self.shards[b].add_(out)
        bucket.work = bucket.wire = bucket.out = None
        self._in_flight.remove(b)
        slot, self._slots[b] = self._slots[b], None
        if slot is not None:
            self._release(slot)

    def _settle(self) -> None:
        """Really zero shards that were cleared and not overwritten since (no backward reduced them)."""
        for b, stale in enumerate(self._stale):
            if stale:
                self.shards[b].zero_()
                self._stale[b] = False

    def optimizer_grads(self) -> dict[int, torch.Tensor]:
        """What the masters get as gradients: this rank's shards (see :meth:`shard_grads`)."""
        return self.shard_grads()

    def shard_grads(self) -> dict[int, torch.Tensor]:
        """``id(param) -> this rank's (unpadded) gradient shard`` for every parameter."""
        self._settle()
        return {
            id(p): layout.segment_view(shard, slot, self.rank)
            for bucket, layout, shard in zip(self.buckets, self.layouts, self.shards)
            for slot, p in enumerate(bucket.params)
        }

    def flat_grads(self) -> list[torch.Tensor]:
        """This rank's shard segments (padding is zero, so norms over them are exact)."""
        self._settle()
        return list(self.shards)

    def zero(self) -> None:
        """Clear the accumulated shards: lazily, the next reduction overwrites them (no memset per step)."""
        self._stale = [True] * len(self.shards)

    @property
    def nbytes(self) -> int:
        """Bytes of gradients: this rank's shards, plus bucket buffers still holding unreduced gradients."""
        held = sum(s.numel() * s.element_size() for s in self.shards)
        return held + sum(
            self.layouts[b].full_numel * self.shards[b].element_size()
            for b, slot in enumerate(self._slots)
            if slot is not None and b not in self._in_flight
        )
