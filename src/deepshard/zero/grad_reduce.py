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
  it; a full bucket is reduce-scattered and its buffer released, so whole gradients never outlive
  their reduction. As in DeepSpeed it reduces after every micro-step; inside ``no_sync`` buffers keep
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
import torch.distributed as dist

from deepshard import comm
from deepshard.comm.bucketing import FlatBuffer, plan_buckets
from deepshard.zero.layout import BucketLayout


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
        self, params: Sequence[torch.nn.Parameter], grad_dtype: torch.dtype, bucket_elements: int, spec: ReduceSpec,
        group: Any, overlap: bool,
    ) -> None:
        ordered = list(reversed(unique_trainable(params)))
        self.overlap = overlap
        self.grad_dtype = grad_dtype
        self.spec = spec
        self.group = group
        self.buckets = [
            _Bucket([ordered[i] for i in idx]) for idx in plan_buckets([p.numel() for p in ordered], bucket_elements)
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

    def __init__(
        self, params: Sequence[torch.nn.Parameter], grad_dtype: torch.dtype, bucket_elements: int, spec: ReduceSpec,
        group: Any = None, overlap: bool = True,
    ) -> None:
        super().__init__(params, grad_dtype, bucket_elements, spec, group, overlap)
        self.buffers = [FlatBuffer([p.shape for p in b.params], grad_dtype, b.params[0].device) for b in self.buckets]
        self.in_place = all(p.dtype == grad_dtype for b in self.buckets for p in b.params)
        self._bind_views()

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
        bucket.work = dist.all_reduce(bucket.wire, group=self.group, async_op=True)

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

    def full_grads(self) -> dict[int, torch.Tensor]:
        """``id(param) -> whole gradient`` for every parameter this reducer owns."""
        return {id(p): v for bucket, buf in zip(self.buckets, self.buffers) for p, v in zip(bucket.params, buf.views)}

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


class ReduceScatterGradReducer(_BucketedReducer):
    """Only this rank's gradient shards persist; buckets are reduce-scattered into them (stage 2)."""

    reduces_every_micro_step = True

    def __init__(
        self, params: Sequence[torch.nn.Parameter], grad_dtype: torch.dtype, bucket_elements: int, spec: ReduceSpec,
        rank: int, group: Any = None, overlap: bool = True,
    ) -> None:
        super().__init__(params, grad_dtype, bucket_elements, spec, group, overlap)
        self.rank = rank
        self.layouts = [BucketLayout([p.shape for p in b.params], spec.world_size) for b in self.buckets]
        device = self.buckets[0].params[0].device if self.buckets else torch.device("cpu")
        self.shards = [torch.zeros(layout.segment_numel, dtype=grad_dtype, device=device) for layout in self.layouts]
        self._full: list[torch.Tensor | None] = [None] * len(self.buckets)

    def _absorb(self, b: int, slot: int, param: torch.Tensor) -> None:
        assert param.grad is not None
        full = self._full[b]
        if full is None:
            full = torch.zeros(self.layouts[b].full_numel, dtype=self.grad_dtype, device=param.grad.device)
            self._full[b] = full
        self.layouts[b].scatter_full(full, slot, param.grad, accumulate=True)
        param.grad = None

    def _start(self, b: int) -> None:
        full = self._full[b]
        if full is None:  # no member got a gradient on this rank: contribute zeros
            full = torch.zeros(self.layouts[b].full_numel, dtype=self.grad_dtype, device=self.shards[b].device)
        self._full[b] = None  # released as soon as the collective owns it
        bucket = self.buckets[b]
        bucket.wire = self._wire(full)
        if self.spec.world_size == 1:
            bucket.out = bucket.wire
            return
        bucket.out = torch.empty(self.layouts[b].segment_numel, dtype=bucket.wire.dtype, device=full.device)
        bucket.work = comm.reduce_scatter_tensor(bucket.out, bucket.wire, group=self.group, async_op=True)

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
        self.shards[b].add_(out)
        bucket.work = bucket.wire = bucket.out = None

    def shard_grads(self) -> dict[int, torch.Tensor]:
        """``id(param) -> this rank's (unpadded) gradient shard`` for every parameter."""
        return {
            id(p): layout.segment_view(shard, slot, self.rank)
            for bucket, layout, shard in zip(self.buckets, self.layouts, self.shards)
            for slot, p in enumerate(bucket.params)
        }

    def flat_grads(self) -> list[torch.Tensor]:
        """This rank's shard segments (padding is zero, so norms over them are exact)."""
        return list(self.shards)

    def zero(self) -> None:
        """Clear the accumulated shards."""
        for shard in self.shards:
            shard.zero_()

    @property
    def nbytes(self) -> int:
        """Bytes held by gradient shards and any bucket buffer still waiting for reduction."""
        live = sum(f.numel() * f.element_size() for f in self._full if f is not None)
        return sum(s.numel() * s.element_size() for s in self.shards) + live
