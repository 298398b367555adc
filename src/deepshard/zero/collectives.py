"""The pack and copy-out around ZeRO's rank-major all-gathers, as stateless functions.

Every all-gather of sharded values in ``zero/`` has one shape: each rank packs its dim-0 rows of a
bucket's members into its *segment* of a rank-major buffer (:mod:`deepshard.zero.layout`), one
``all_gather_into_tensor`` fills the other segments, and every rank's rows are copied out of the buffer
into the members' whole values. The classes (:class:`~deepshard.zero.shard_group.ShardGroup` at stage 3,
:class:`~deepshard.zero.param_gather.ParamGatherer` at stages 1-2, the fragment API) decide when; the
functions here say how. Each copy is one multi-tensor ``_foreach_copy_`` (padding rows are never copied).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from deepshard import comm
from deepshard.zero.layout import BucketLayout, ShardSpec

Copies = list[tuple[int, int, int]]
"""``(offset in the members' flat whole buffer, offset in the rank-major buffer, elements)`` per copy."""


def rank_major_copies(layout: BucketLayout, numels: Sequence[int]) -> Copies:
    """The copies that unpack every rank's rows of every member from a rank-major buffer into one flat
    buffer holding the members back to back (member ``i`` has ``numels[i]`` elements)."""
    seg = layout.segment_numel
    copies: Copies = []
    offset = 0
    for i, (numel, spec) in enumerate(zip(numels, layout.specs)):
        for q in range(layout.world):
            start, end = spec.row_range(q)
            if end > start:
                copies.append(
                    (
                        offset + start * spec.row_numel,
                        q * seg + layout.offsets[i],
                        (end - start) * spec.row_numel,
                    )
                )
        offset += numel
    return copies


def copy_out(full: torch.Tensor, rank_major: torch.Tensor, copies: Copies) -> None:
    """Run ``copies`` (see :func:`rank_major_copies`) from the flat ``rank_major`` buffer into ``full``."""
    if copies:
        torch._foreach_copy_(
            [full[d : d + n] for d, _, n in copies], [rank_major[s : s + n] for _, s, n in copies]
        )


def copy_out_rows(
    layout: BucketLayout,
    rank_major: torch.Tensor,
    rows: Sequence[Sequence[torch.Tensor]],
    skip: int | None = None,
) -> None:
    """Copy every rank's rows from ``rank_major`` into ``rows[q][i]`` (rank ``q``'s rows of member ``i``,
    views of the whole parameters), leaving out rank ``skip`` (this rank: its rows are already there)."""
    segments = rank_major.view(layout.world, layout.segment_numel)
    dst: list[torch.Tensor] = []
    src: list[torch.Tensor] = []
    for q in range(layout.world):
        if q == skip:
            continue
        for slot, target in enumerate(rows[q]):
            if target.numel():
                dst.append(target)
                src.append(layout.segment_view(segments[q], slot, q).view(target.shape))
    if dst:
        torch._foreach_copy_(dst, src)


def own_segment(layout: BucketLayout, rank_major: torch.Tensor, rank: int) -> torch.Tensor:
    """This rank's segment of ``rank_major`` (where it packs its rows before the all-gather)."""
    return rank_major.view(layout.world, layout.segment_numel)[rank]


def gather_whole(
    local: torch.Tensor, shape: torch.Size, world: int, group: Any = None, dtype: torch.dtype | None = torch.float32
) -> torch.Tensor:
    """One parameter's whole value of ``shape`` from every rank's dim-0 rows ``local`` (collective).

    In ``dtype`` (``None``: ``local``'s), always a fresh tensor: the fragment API's fp32 reads, and
    ``GatheredParameters`` over ``zero.Init``'s rows before an engine exists. A whole shard goes over
    the wire as it is (no padded copy), and the result is a view of the receive buffer (no final copy).
    """
    local = local.detach().to(dtype or local.dtype)
    if world == 1:
        return local.reshape(shape).clone()
    spec = ShardSpec(torch.Size(shape), world)
    if local.numel() == spec.shard_numel and local.is_contiguous():
        padded = local.reshape(-1)
    else:
        padded = torch.zeros(spec.shard_numel, dtype=local.dtype, device=local.device)
        padded[: local.numel()] = local.reshape(-1)
    full = torch.empty(spec.shard_numel * world, dtype=local.dtype, device=local.device)
    comm.all_gather_into_tensor(full, padded, group=group)
    return full.view(spec.shard_rows * world, spec.row_numel)[: spec.rows].reshape(shape)
