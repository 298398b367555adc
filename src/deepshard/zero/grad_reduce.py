"""Gradient reduction for data parallelism: bucketed all-reduce launched from backward hooks.

Each parameter that needs a gradient owns a slice of a flat gradient buffer (its *bucket*). Buckets
follow the reverse of registration order, which approximates the order in which backward produces
gradients, so that the first buckets fill, and start communicating, while backward is still running.

Two ways to hold gradients, chosen by ``grad_dtype``:

* ``grad_dtype == param.dtype``: ``param.grad`` *is* the bucket view (autograd accumulates in place,
  as DDP's ``gradient_as_bucket_view``), so no copy is made;
* otherwise (bf16 params with fp32 accumulation): a post-accumulate hook adds the fresh gradient into
  the fp32 view and frees it, so only one full-size low-precision gradient is alive at a time.

Buckets are launched strictly in index order on every rank (a bucket waits for its predecessors), so
ranks issue the same collectives in the same order even if a parameter gets no gradient on some
rank. Trade-off: smaller buckets overlap more of backward but issue more collectives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from deepshard.comm.bucketing import FlatBuffer, plan_buckets


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


class _Bucket:
    """One flat gradient buffer, its members, and its in-flight collective."""

    def __init__(self, params: list[torch.nn.Parameter], grad_dtype: torch.dtype) -> None:
        self.params = params
        self.buffer = FlatBuffer([p.shape for p in params], grad_dtype, params[0].device)
        self.pending = len(params)
        self.work: Any = None
        self.wire: torch.Tensor | None = None  # the tensor being reduced (a cast copy when dtypes differ)

    def reset(self) -> None:
        self.pending = len(self.params)
        self.work = None
        self.wire = None


class GradReducer:
    """Owns gradient buffers of ``params`` and all-reduces them at accumulation boundaries.

    Call :meth:`begin_backward` before each backward with whether this backward must reduce, and
    :meth:`finish` after it; :meth:`zero` clears the buffers after the optimizer step.
    """

    def __init__(
        self,
        params: Sequence[torch.nn.Parameter],
        grad_dtype: torch.dtype,
        bucket_elements: int,
        spec: ReduceSpec,
        group: Any = None,
    ) -> None:
        trainable = [p for p in params if p.requires_grad]
        seen: set[int] = set()
        unique = [p for p in trainable if not (id(p) in seen or seen.add(id(p)))]  # type: ignore[func-returns-value]
        ordered = list(reversed(unique))
        self.grad_dtype = grad_dtype
        self.spec = spec
        self.group = group
        self.buckets = [
            _Bucket([ordered[i] for i in idx], grad_dtype)
            for idx in plan_buckets([p.numel() for p in ordered], bucket_elements)
        ]
        self._where: dict[int, tuple[_Bucket, int]] = {}
        for bucket in self.buckets:
            for slot, p in enumerate(bucket.params):
                self._where[id(p)] = (bucket, slot)
        self._reducing = False
        self._next_launch = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in ordered]
        self._bind_views()

    # ------------------------------------------------------------------ buffers
    @property
    def in_place(self) -> bool:
        """Whether ``param.grad`` aliases the bucket (same dtype) instead of being copied into it."""
        return all(b.params[0].dtype == self.grad_dtype for b in self.buckets)

    def _bind_views(self) -> None:
        """Point ``param.grad`` at its bucket view (in-place mode), keeping any gradient already there."""
        if not self.in_place:
            return
        for bucket in self.buckets:
            for p, view in zip(bucket.params, bucket.buffer.views):
                if p.grad is None or p.grad.data_ptr() != view.data_ptr():
                    if p.grad is not None:
                        view.copy_(p.grad)
                    p.grad = view

    def grad_views(self) -> dict[int, torch.Tensor]:
        """``id(param) -> gradient view`` for every parameter this reducer owns."""
        return {id(p): view for b in self.buckets for p, view in zip(b.params, b.buffer.views)}

    def flat_buffers(self) -> list[torch.Tensor]:
        """The flat gradient tensors, one per bucket."""
        return [b.buffer.flat for b in self.buckets]

    def zero(self) -> None:
        """Clear all gradients (in place, so ``param.grad`` views stay bound)."""
        for bucket in self.buckets:
            bucket.buffer.flat.zero_()
        self._bind_views()

    @property
    def nbytes(self) -> int:
        """Bytes held by the gradient buffers."""
        return sum(b.buffer.nbytes for b in self.buckets)

    # ------------------------------------------------------------------ backward
    def begin_backward(self, reduce: bool) -> None:
        """Arm the hooks for one backward; ``reduce``: launch collectives as buckets fill."""
        self._bind_views()
        self._reducing = reduce and self.spec.world_size > 1
        self._next_launch = 0
        for bucket in self.buckets:
            bucket.reset()

    def _on_grad(self, param: torch.Tensor) -> None:
        bucket, slot = self._where[id(param)]
        if not self.in_place:
            assert param.grad is not None
            bucket.buffer.views[slot].add_(param.grad)
            param.grad = None
        if not self._reducing:
            return
        bucket.pending -= 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].pending <= 0:
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1

    def _launch(self, bucket: _Bucket) -> None:
        flat = bucket.buffer.flat
        wire = flat if flat.dtype == self.spec.reduce_dtype else flat.to(self.spec.reduce_dtype)
        before = self.spec.before()
        if before != 1.0:
            wire.mul_(before)
        bucket.wire = wire
        bucket.work = dist.all_reduce(wire, group=self.group, async_op=True)

    def finish(self) -> None:
        """Launch buckets that never filled (unused parameters), wait for all, and average."""
        if not self._reducing:
            return
        while self._next_launch < len(self.buckets):
            self._launch(self.buckets[self._next_launch])
            self._next_launch += 1
        after = self.spec.after()
        for bucket in self.buckets:
            assert bucket.work is not None and bucket.wire is not None
            bucket.work.wait()
            if after != 1.0:
                bucket.wire.mul_(after)
            if bucket.wire is not bucket.buffer.flat:
                bucket.buffer.flat.copy_(bucket.wire)
            bucket.reset()
        self._reducing = False

    def remove_hooks(self) -> None:
        """Detach from the parameters (the engine is being torn down)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
