"""Ulysses runs for the harness's ranks (not a test module: pickled by reference)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812

import deepshard.comm as comm
from deepshard.sequence import DistributedAttention

SEQ, BATCH, DIM = 12, 2, 4


def sdpa_sbhd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """Local attention on DeepSpeed's ``[s, b, h, d]`` layout."""
    out = F.scaled_dot_product_attention(*(x.permute(1, 2, 0, 3) for x in (q, k, v)), is_causal=causal)
    return out.permute(2, 0, 1, 3)


def full_inputs(heads: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [
        torch.randn(SEQ, BATCH, heads, DIM, generator=g, dtype=torch.float64) for _ in range(4)
    ]  # q k v dout


def reference(heads: int) -> list[torch.Tensor]:
    """Single-process attention over the whole sequence: output and q/k/v grads."""
    q, k, v, dout = full_inputs(heads)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    out = sdpa_sbhd(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def sdpa_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Local attention on the batch-first ``[b, s, h, d]`` layout."""
    return sdpa_sbhd(*(x.transpose(0, 1) for x in (q, k, v))).transpose(0, 1)


def ulysses(heads: int, batch_first: bool = False) -> dict[str, Any]:
    """This rank's block of the sequence through DistributedAttention: output, grads, bytes sent."""
    world, rank = comm.get_world_size(), comm.get_rank()
    block = slice(rank * SEQ // world, (rank + 1) * SEQ // world)
    q, k, v, dout = (x[block] for x in full_inputs(heads))
    if batch_first:
        q, k, v, dout = (x.transpose(0, 1) for x in (q, k, v, dout))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    sent: list[int] = []
    original = comm.all_to_all_single

    def counting(output: torch.Tensor, tensor: torch.Tensor, **kw: Any) -> Any:
        sent.append(tensor.numel() * tensor.element_size())
        return original(output, tensor, **kw)

    comm.all_to_all_single = counting  # type: ignore[assignment]  # counts this run's traffic only
    try:
        if batch_first:
            attn = DistributedAttention(sdpa_bshd, None, scatter_idx=2, gather_idx=1)
        else:
            attn = DistributedAttention(sdpa_sbhd, None, scatter_idx=2, gather_idx=0)
        out = attn(*leaves)
        forward_bytes = sum(sent)
        grads = torch.autograd.grad(out, leaves, dout)
    finally:
        comm.all_to_all_single = original  # type: ignore[assignment]
    if batch_first:  # back to [s, b, h, d] for the comparison
        out, grads = out.transpose(0, 1), tuple(g.transpose(0, 1) for g in grads)
    return {
        "block": block,
        "out": out.detach(),
        "grads": grads,
        "forward_bytes": forward_bytes,
        "all": sum(sent),
    }
