"""The differentiable all-to-all of Ulysses: split one dim across the sp ranks, gather another.

Communication: each call sends every element of its input once (``numel`` elements per rank, ``1/P``
of it to itself), so an attention layer's four calls (q, k, v in; the context out) move
``4 * S * hidden / P`` elements per rank for a local sequence block of ``S / P`` tokens. Uneven splits
(a head count not divisible by ``P``) are padded to the largest part for the exchange and trimmed after:
at most ``P - 1`` padded heads travel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

from deepshard import comm


def split_sizes(total: int, parts: int) -> list[int]:
    """``torch.tensor_split``'s part sizes: the first ``total % parts`` parts get one more."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def _exchange(
    x: torch.Tensor,
    scatter_dim: int,
    gather_dim: int,
    group: Any,
    scatter_sizes: Sequence[int],
    gather_sizes: Sequence[int],
) -> torch.Tensor:
    world, rank = len(scatter_sizes), comm.get_rank(group)
    ms, mg = max(scatter_sizes), max(gather_sizes)
    moved = x.movedim((scatter_dim, gather_dim), (0, 1))  # [scatter, gather_local, *rest]
    pieces = []
    for piece in torch.split(moved, list(scatter_sizes), dim=0):
        pad = [0, 0] * (piece.dim() - 2) + [0, mg - piece.shape[1], 0, ms - piece.shape[0]]
        pieces.append(F.pad(piece, pad) if any(pad) else piece)
    send = torch.stack(pieces)  # [P, ms, mg, *rest]: part j goes to rank j
    recv = torch.empty_like(send)
    comm.all_to_all_single(recv, send, group=group)
    # recv[j]: rank j's gather block of my scatter part
    parts = [recv[j, : scatter_sizes[rank], : gather_sizes[j]] for j in range(world)]
    return torch.cat(parts, dim=1).movedim((0, 1), (scatter_dim, gather_dim))


class _SeqAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        group: Any,
        x: torch.Tensor,
        scatter_dim: int,
        gather_dim: int,
        scatter_sizes: list[int],
        gather_sizes: list[int],
    ) -> torch.Tensor:
        ctx.args = (group, scatter_dim, gather_dim, scatter_sizes, gather_sizes)
        return _exchange(x, scatter_dim, gather_dim, group, scatter_sizes, gather_sizes)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        group, scatter_dim, gather_dim, scatter_sizes, gather_sizes = ctx.args
        # the transpose of an all-to-all is the all-to-all the other way
        back = _SeqAllToAll.apply(
            group, grad.contiguous(), gather_dim, scatter_dim, gather_sizes, scatter_sizes
        )
        return None, back, None, None, None, None


def seq_all_to_all(
    x: torch.Tensor,
    scatter_dim: int,
    gather_dim: int,
    group: Any = None,
    gather_sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Split ``x`` along ``scatter_dim`` across the ranks of ``group`` and concatenate what arrives along
    ``gather_dim`` (differentiable; identity for one rank).

    ``scatter_dim`` is split with :func:`split_sizes`; ``gather_sizes[j]`` is the size of ``gather_dim``
    on rank ``j`` (default: this rank's size on every rank).
    """
    world = comm.get_world_size(group)
    scatter_dim %= x.dim()
    gather_dim %= x.dim()
    if scatter_dim == gather_dim:
        raise ValueError(f"seq_all_to_all: scatter_dim and gather_dim must differ, both are {scatter_dim}")
    if world == 1:
        return x
    sizes = split_sizes(x.shape[scatter_dim], world)
    gathered = list(gather_sizes) if gather_sizes is not None else [x.shape[gather_dim]] * world
    if len(gathered) != world:
        raise ValueError(
            f"seq_all_to_all: gather_sizes has {len(gathered)} entries, the group has {world} ranks"
        )
    out: torch.Tensor = _SeqAllToAll.apply(group, x.contiguous(), scatter_dim, gather_dim, sizes, gathered)
    return out
