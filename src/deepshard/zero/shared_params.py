"""One copy of the trainable parameters for all ranks of a host (ZeRO stages 1 and 2 on gloo).

At stages 1 and 2 every rank holds the whole parameters, identical on all ranks, and after each step
the ranks exchange the rows they updated. When all ranks of the data-parallel group run on one host,
that exchange can vanish: the parameters are placed in one shared-memory mapping
(:func:`deepshard.comm.host_shm.shared_storage`) that every rank's module points at, and each rank's
optimizer writes its own rows straight into it. Publishing the update is then a fence, not an
all-gather: no bytes are copied, and the host holds the parameters once instead of once per rank.

The protocol around an update (the engine's step, the fragment setters, checkpoint loads):
``begin_update()`` fences, so that no rank still reads the parameters (a forward or backward in
flight) when another starts writing; each rank writes only its own rows (or every rank writes the
same values); ``finish_update()`` casts this rank's masters into its rows where the masters are fp32
copies, then fences, so that every rank sees every row before it reads again.

Conditions: a gloo group on one host, CPU parameters; otherwise :meth:`SharedParameters.create`
returns ``None`` and the all-gather path is used. ``zero_optimization.host_shared_memory: false`` (or the
overriding environment variable ``DEEPSHARD_HOST_SHM=0``) turns it off. The
parameters' storage must not be replaced after ``initialize`` (``module.to(...)``, ``.half()``); a
step detects that and stops with an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from deepshard import comm
from deepshard.comm.host_shm import release_freed_heap, shared_regions
from deepshard.precision.master import MasterWeights, as_rows

_ALIGN = 64  # bytes between parameters in the mapping


class SharedStorageError(ValueError, RuntimeError):
    """The model's parameters were moved out of the shared mapping after ``initialize`` (a user error with
    its fix; also a ``RuntimeError``, which it was before, for callers that catch that)."""


class SharedParameters:
    """The trainable parameters re-homed into one mapping shared by the ranks of a host."""

    def __init__(self, params: list[torch.Tensor], storage: torch.Tensor, group: Any) -> None:
        self.params = params
        self.storage = storage
        self.group = group
        self._ptrs = [p.data_ptr() for p in params]

    @classmethod
    @torch.no_grad()
    def create(
        cls, params: Sequence[torch.Tensor], group: Any = None, configured: bool = True
    ) -> SharedParameters | None:
        """Move ``params`` (identical on every rank) into shared memory; collective; ``None`` if impossible."""
        params = list(params)
        usable = all(p.device.type == "cpu" and p.is_contiguous() for p in params) and bool(params)
        nbytes = [p.numel() * p.element_size() for p in params]
        regions = shared_regions(group, nbytes, usable, _ALIGN, configured)
        if regions is None:
            return None
        storage = regions[0]._base if regions[0]._base is not None else regions[0]  # the whole mapping
        views = [r.view(p.dtype).view(p.shape) for p, r in zip(params, regions)]
        if comm.get_rank(group) == 0:
            for p, view in zip(params, views):
                view.copy_(p.data)
        comm.barrier(group=group)
        for p, view in zip(params, views):
            p.data = view
        release_freed_heap()  # the private copies just dropped
        return cls(params, storage, group)

    def _check(self) -> None:
        if [p.data_ptr() for p in self.params] != self._ptrs:
            raise SharedStorageError(
                "a parameter's storage was replaced after deepshard.initialize() (e.g. engine.module.to(...) or "
                ".half()); at ZeRO stages 1-2 on one host the parameters live in shared memory, so move or cast "
                "the model before initialize(), or set zero_optimization.host_shared_memory to false (or DEEPSHARD_HOST_SHM=0)."
            )

    def begin_update(self) -> None:
        """Wait until no rank reads the parameters any more (call before writing rows)."""
        self._check()
        comm.barrier(group=self.group)

    @torch.no_grad()
    def finish_update(self, masters: MasterWeights) -> None:
        """Write this rank's fp32 masters into its rows when they are copies, then make all rows visible."""
        if masters.needs_fp32_copy and not masters.published_early:
            ranges = [masters.range_of(p) for p in self.params]
            rows = [
                as_rows(p.data)[r[0] : r[1]] if r is not None else p.data for p, r in zip(self.params, ranges)
            ]
            pairs = [
                (dst, src.view(dst.shape))
                for dst, src in zip(rows, masters.masters_of(self.params))
                if dst.numel()
            ]
            if pairs:
                torch._foreach_copy_([d for d, _ in pairs], [s for _, s in pairs])
        comm.barrier(group=self.group)
