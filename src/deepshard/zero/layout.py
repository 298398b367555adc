"""Where each rank's dim-0 shard of each parameter lives, inside a bucket's communication buffer.

A parameter of shape ``(d0, *rest)`` is split into ``world`` shards of ``ceil(d0 / world)`` rows
(``torch.chunk`` semantics); the last shards may be short or empty, and are padded with zero rows
in communication buffers only (the optimizer sees unpadded shards). A 0-d parameter counts as one row.

A bucket of parameters ``p_1..p_k`` has a per-rank *segment* of ``S = sum_i shard_rows_i * row_numel_i``
elements: this rank's shards of every member, back to back. The bucket's full buffer is rank-major,
``[segment of rank 0 | segment of rank 1 | ...]``, which is exactly the input layout of
``reduce_scatter_tensor`` and the output layout of ``all_gather_into_tensor``: one collective moves a
whole bucket, and each rank's result is contiguous.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ShardSpec:
    """Dim-0 sharding of one parameter over ``world`` ranks."""

    shape: torch.Size
    world: int

    @property
    def rows(self) -> int:
        """Length of dim 0 (1 for a 0-d tensor)."""
        return self.shape[0] if len(self.shape) > 0 else 1

    @property
    def row_numel(self) -> int:
        """Elements per dim-0 row."""
        return self.shape[1:].numel() if len(self.shape) > 0 else 1

    @property
    def shard_rows(self) -> int:
        """Rows per shard, padding included (``ceil(rows / world)``)."""
        return -(-self.rows // self.world)

    @property
    def shard_numel(self) -> int:
        """Elements per padded shard."""
        return self.shard_rows * self.row_numel

    def row_range(self, rank: int) -> tuple[int, int]:
        """``[start, end)`` rows of the unpadded parameter that ``rank`` owns (possibly empty)."""
        start = min(rank * self.shard_rows, self.rows)
        return start, min(start + self.shard_rows, self.rows)

    def local_shape(self, rank: int) -> torch.Size:
        """Shape of ``rank``'s unpadded shard."""
        start, end = self.row_range(rank)
        return (
            torch.Size([end - start, *self.shape[1:]]) if len(self.shape) > 0 else torch.Size([end - start])
        )


class BucketLayout:
    """Offsets of each member's shard inside a bucket's per-rank segment."""

    def __init__(self, shapes: Sequence[torch.Size], world: int) -> None:
        self.world = world
        self.specs = [ShardSpec(torch.Size(s), world) for s in shapes]
        self.offsets: list[int] = []
        total = 0
        for spec in self.specs:
            self.offsets.append(total)
            total += spec.shard_numel
        self.segment_numel = total

    @property
    def full_numel(self) -> int:
        """Elements of the rank-major buffer (all segments)."""
        return self.segment_numel * self.world

    def _columns(self, buffer: torch.Tensor, index: int) -> torch.Tensor:
        """``(world, shard_numel)`` strided view of member ``index`` across all segments of ``buffer``."""
        off, n = self.offsets[index], self.specs[index].shard_numel
        return buffer.view(self.world, self.segment_numel)[:, off : off + n]

    def scatter_full(self, buffer: torch.Tensor, index: int, full: torch.Tensor, accumulate: bool) -> None:
        """Write (or add) a full-size tensor of member ``index`` into the rank-major ``buffer``."""
        spec = self.specs[index]
        cols = self._columns(buffer, index)
        src = full.reshape(spec.rows, spec.row_numel)
        if spec.shard_rows * self.world == spec.rows:
            # no padding: one strided copy moves every rank's shard
            pairs = [(cols, src.view(self.world, spec.shard_numel))]
        else:
            pairs = []
            for rank in range(self.world):
                start, end = spec.row_range(rank)
                if end > start:
                    pairs.append((cols[rank, : (end - start) * spec.row_numel], src[start:end].reshape(-1)))
        for dst, part in pairs:
            if accumulate:
                dst.add_(part)
            else:
                dst.copy_(part)

    @property
    def padded(self) -> bool:
        """Whether any member's shards carry padding rows."""
        return any(spec.shard_rows * self.world != spec.rows for spec in self.specs)

    def zero_member(self, buffer: torch.Tensor, index: int) -> None:
        """Zero member ``index`` (padding included) in every segment of the rank-major ``buffer``."""
        self._columns(buffer, index).zero_()

    def zero_padding(self, buffer: torch.Tensor) -> None:
        """Zero the padding rows of every member in every segment of the rank-major ``buffer``."""
        for index, spec in enumerate(self.specs):
            if spec.shard_rows * self.world == spec.rows:
                continue
            cols = self._columns(buffer, index)
            for rank in range(self.world):
                start, end = spec.row_range(rank)
                cols[rank, (end - start) * spec.row_numel :].zero_()

    def segment_view(self, segment: torch.Tensor, index: int, rank: int) -> torch.Tensor:
        """Member ``index``'s unpadded shard inside one rank's ``segment``, shaped as the local shard."""
        spec = self.specs[index]
        start, end = spec.row_range(rank)
        off = self.offsets[index]
        return segment[off : off + (end - start) * spec.row_numel].view(spec.local_shape(rank))


def reusable_layouts(layouts: Sequence[BucketLayout], bucket_elements: int) -> list[BucketLayout]:
    """The buckets that reusable bucket-size buffers are sized for.

    A bucket holding a single parameter larger than the bucket size (an embedding, say) is left out:
    it gets a buffer of its own for the moment it needs one, so the kept buffers stay bucket-sized.
    """
    return [layout for layout in layouts if layout.full_numel <= 2 * bucket_elements] or list(layouts)
