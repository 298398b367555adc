"""Bucketing: pack many tensors into few flat buffers so that one collective moves a whole bucket.

Pure planning (:func:`plan_buckets`) is separate from the buffers (:class:`FlatBuffer`) so that every
stage can reuse both: stage 0/1 all-reduce a bucket, stage 2 reduce-scatters it, stage 3 gathers it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist


def plan_buckets(sizes: Sequence[int], max_elements: int) -> list[list[int]]:
    """Split indices ``0..len(sizes)-1``, in order, into consecutive buckets of at most ``max_elements``.

    A tensor larger than ``max_elements`` gets a bucket of its own. Every index appears exactly once.
    """
    if max_elements <= 0:
        raise ValueError(f"bucket size must be a positive number of elements, got {max_elements}")
    buckets: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for index, size in enumerate(sizes):
        if current and filled + size > max_elements:
            buckets.append(current)
            current, filled = [], 0
        current.append(index)
        filled += size
    if current:
        buckets.append(current)
    return buckets


class FlatBuffer:
    """One contiguous 1-D tensor and a view into it for each member tensor shape.

    Member ``i`` occupies ``flat[offsets[i] : offsets[i] + numel_i]``; ``views[i]`` has its shape.
    """

    def __init__(
        self,
        shapes: Sequence[torch.Size],
        dtype: torch.dtype,
        device: torch.device,
        flat: torch.Tensor | None = None,
    ) -> None:
        """``flat``: zeroed memory to use (e.g. shared memory) instead of a new allocation."""
        self.shapes = [torch.Size(s) for s in shapes]
        numels = [s.numel() for s in self.shapes]
        self.offsets = [sum(numels[:i]) for i in range(len(numels))]
        self.numel = sum(numels)
        self.flat = (
            torch.zeros(self.numel, dtype=dtype, device=device) if flat is None else flat[: self.numel]
        )
        self.views = [
            self.flat[off : off + n].view(shape) for off, n, shape in zip(self.offsets, numels, self.shapes)
        ]

    @property
    def nbytes(self) -> int:
        """Bytes held by the flat tensor."""
        return self.flat.numel() * self.flat.element_size()


def broadcast_coalesced(
    tensors: Sequence[torch.Tensor], src: int, group: Any = None, max_elements: int = 2**26
) -> None:
    """Broadcast ``tensors`` from global rank ``src`` with one collective per bucket and dtype."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for members in by_dtype.values():
        for bucket in plan_buckets([t.numel() for t in members], max_elements):
            chunk = [members[i] for i in bucket]
            flat = torch.cat([t.detach().reshape(-1) for t in chunk])
            dist.broadcast(flat, src=src, group=group)
            offset = 0
            with torch.no_grad():
                for t in chunk:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()
