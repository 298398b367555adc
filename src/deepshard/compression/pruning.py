"""Pruning masks: the ``ceil(dense_ratio * n)`` highest scores kept, element-wise, per row, head, channel or block.

Scores are ``|w|`` (``l1`` sparse), the L1 norm of a row / channel / head slice (``l1`` structured), learned
parameters (``topk``: the mask's gradient reaches the scores unchanged, so they train with the model) or
an exponential moving average of ``|w * dL/dw|`` summed over ``RxC`` blocks (``snip_momentum``). Ties are
broken by position, so a mask always keeps exactly ``ceil(dense_ratio * n)`` entries.
"""

from __future__ import annotations

import math

import torch

from deepshard.compression.quantizers import straight_through


def keep_count(n: int, dense_ratio: float) -> int:
    """How many of ``n`` entries a mask of ``dense_ratio`` keeps (DeepSpeed's ``ceil``, at least one)."""
    return max(1, min(n, math.ceil(dense_ratio * n)))


def topk_mask(scores: torch.Tensor, dense_ratio: float) -> torch.Tensor:
    """A 0/1 mask shaped like ``scores`` keeping its ``keep_count`` largest; gradient straight to ``scores``."""
    flat = scores.detach().flatten()
    keep = torch.zeros_like(flat)
    keep[torch.argsort(flat, descending=True, stable=True)[: keep_count(flat.numel(), dense_ratio)]] = 1.0
    mask = keep.reshape(scores.shape)
    return straight_through(scores, mask) if scores.requires_grad else mask


def parse_block(pattern: str) -> tuple[int, int]:
    """``"4x1"`` -> ``(4, 1)``: blocks of 4 consecutive rows (outputs) by 1 column (input)."""
    rows, _, cols = pattern.partition("x")
    return int(rows), int(cols)


def block_scores(scores: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Sum of an ``[out, in]`` score matrix over ``RxC`` blocks: ``[out / R, in / C]``."""
    r, c = block
    out_f, in_f = scores.shape
    if out_f % r or in_f % c:
        raise ValueError(
            f"block_pattern {r}x{c} does not tile a [{out_f}, {in_f}] weight; choose a pattern whose "
            f"sides divide {out_f} and {in_f}."
        )
    return scores.reshape(out_f // r, r, in_f // c, c).sum((1, 3))


def expand_block(mask: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """A ``[out / R, in / C]`` block mask repeated back to ``[out, in]``."""
    r, c = block
    return mask.repeat_interleave(r, 0).repeat_interleave(c, 1)


def row_l1(weight: torch.Tensor) -> torch.Tensor:
    """L1 norm of each output row (or output channel of a conv weight): ``[out]``."""
    return weight.detach().abs().flatten(1).sum(1)


def head_l1(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """L1 norm of each head's input columns of an output projection ``[out, heads * head_dim]``: ``[heads]``."""
    return weight.detach().abs().t().reshape(num_heads, -1).sum(1)


def cubic_density(step: int, start: int, end: int, final: float) -> float:
    """Density at ``step`` of a cubic ramp from 1 at ``start`` to ``final`` at ``end`` (gradual pruning)."""
    if step >= end:
        return final
    if step <= start:
        return 1.0
    frac = (step - start) / (end - start)
    return final + (1.0 - final) * (1.0 - frac) ** 3
