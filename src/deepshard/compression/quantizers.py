"""Fake quantization for training (QAT) with a straight-through estimator, on DeepSpeed's grids.

A tensor is cut into ``num_groups`` equal contiguous groups of its flattened elements (DeepSpeed's
``quantize_groups``: for an ``[out, in]`` weight and ``num_groups = out * in / g``, each group is ``g``
consecutive inputs of one row). Within a group, with ``n = 2**bits``:

- symmetric: ``scale = 2 * max|x| / n``; ``q = clamp(round(x / scale), -n/2, n/2 - 1)``; ``x ~ q * scale``;
- asymmetric: ``scale = (max - min) / n``; ``zero = round(min / scale) * scale``;
  ``q = clamp(round((x - zero) / scale), 0, n - 1)``; ``x ~ q * scale + zero``;
- ternary (2 bits, XTC): ``t = 0.7 * mean|x|``; ``x ~ alpha * sign(x) * [|x| > t]`` with ``alpha`` the mean
  of ``|x|`` above ``t``;
- binary (1 bit): ``x ~ sign(x) * mean|x|``.

Every grid has at most ``2**bits`` values per group (ternary: 3, binary: 2). Stochastic rounding adds
``U(-0.5, 0.5)`` before rounding, so the result is unbiased in expectation. The backward of every
quantizer is the identity (straight-through): QAT trains the float weights through the rounding.
Static activation ranges are an exponential moving average of the batch min/max (momentum 0.95), updated
in training and frozen in eval, as DeepSpeed's ``QuantAct``.
"""

from __future__ import annotations

import enum
from typing import Any

import torch
from torch import nn


class Rounding(enum.Enum):
    """How a scaled value becomes an integer."""

    NEAREST = "nearest"
    STOCHASTIC = "stochastic"


def _round(x: torch.Tensor, rounding: Rounding) -> torch.Tensor:
    if rounding is Rounding.STOCHASTIC:
        return torch.round(x + torch.empty_like(x).uniform_(-0.5, 0.5))
    return torch.round(x)


def _groups(x: torch.Tensor, num_groups: int) -> torch.Tensor:
    if num_groups < 1 or x.numel() % num_groups:
        raise ValueError(
            f"quantize_groups={num_groups} does not divide the {x.numel()} elements of a {tuple(x.shape)} tensor; "
            "pick a divisor of the element count."
        )
    return x.reshape(num_groups, -1)


def quantize_symmetric(
    x: torch.Tensor,
    bits: int,
    num_groups: int = 1,
    rounding: Rounding = Rounding.NEAREST,
    max_abs: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` on the symmetric ``bits``-bit grid of each group (or of the static range ``max_abs``)."""
    n = 2**bits
    g = _groups(x, num_groups) if max_abs is None else x.reshape(1, -1)
    top = g.abs().amax(-1, keepdim=True) if max_abs is None else max_abs.reshape(1, 1)
    scale = (2 * top / n).clamp_min(torch.finfo(torch.float32).tiny)
    q = _round(g / scale, rounding).clamp(-n // 2, n // 2 - 1)
    return (q * scale).reshape(x.shape)


def quantize_asymmetric(
    x: torch.Tensor,
    bits: int,
    num_groups: int = 1,
    rounding: Rounding = Rounding.NEAREST,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x`` on the asymmetric ``bits``-bit grid of each group (or of the static range ``[lo, hi]``)."""
    n = 2**bits
    g = _groups(x, num_groups) if lo is None else x.reshape(1, -1)
    if lo is None or hi is None:
        lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    else:
        lo, hi = lo.reshape(1, 1), hi.reshape(1, 1)
    scale = ((hi - lo) / n).clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.round(lo / scale) * scale
    q = _round((g - zero) / scale, rounding).clamp(0, n - 1)
    return (q * scale + zero).reshape(x.shape)


def quantize_ternary(x: torch.Tensor, num_groups: int = 1) -> torch.Tensor:
    """``x`` on each group's ternary grid ``{-alpha, 0, alpha}`` (XTC / TWN)."""
    g = _groups(x, num_groups)
    thres = 0.7 * g.abs().mean(-1, keepdim=True)
    keep = (g.abs() > thres).to(g.dtype)
    alpha = (keep * g).abs().sum(-1, keepdim=True) / keep.sum(-1, keepdim=True).clamp_min(1.0)
    return (alpha * torch.sign(g) * keep).reshape(x.shape)


def quantize_binary(x: torch.Tensor, num_groups: int = 1) -> torch.Tensor:
    """``x`` on each group's binary grid ``{-m, m}``, ``m = mean|x|``."""
    g = _groups(x, num_groups)
    return (torch.sign(g) * g.abs().mean(-1, keepdim=True)).reshape(x.shape)


def quantize_weight(
    w: torch.Tensor, bits: int, num_groups: int, symmetric: bool, rounding: Rounding = Rounding.NEAREST
) -> torch.Tensor:
    """``w`` on its ``bits``-bit grid: ternary for 2 bits, binary for 1 bit (both symmetric only)."""
    if bits >= 3:
        if symmetric:
            return quantize_symmetric(w, bits, num_groups, rounding)
        return quantize_asymmetric(w, bits, num_groups, rounding)
    if not symmetric:
        raise ValueError(
            f"{bits}-bit weights are {'ternary' if bits == 2 else 'binary'}, which is symmetric only; "
            "set quantization_type to 'symmetric'."
        )
    if bits == 2:
        return quantize_ternary(w, num_groups)
    if bits == 1:
        return quantize_binary(w, num_groups)
    raise ValueError(f"bits={bits}: weight quantization needs at least 1 bit.")


class _StraightThrough(torch.autograd.Function):
    """Forward: ``quantized`` (computed outside); backward: the identity to ``x``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return quantized

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad, None


def straight_through(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """``quantized`` in the forward, with the gradient flowing to ``x`` unchanged (STE)."""
    return _StraightThrough.apply(x, quantized.detach())  # type: ignore[no-any-return]


def fake_quantize_weight(
    w: torch.Tensor, bits: int, num_groups: int, symmetric: bool, rounding: Rounding = Rounding.NEAREST
) -> torch.Tensor:
    """:func:`quantize_weight` in the forward, identity in the backward."""
    with torch.no_grad():
        q = quantize_weight(w, bits, num_groups, symmetric, rounding)
    return straight_through(w, q)


class ActivationQuantizer(nn.Module):
    """Quantizes a layer's input: ``dynamic`` ranges per token (last dim), or one ``static`` range (EMA).

    Buffers: ``x_min_max`` ``[2]`` (static only), the running ``(min, max)``; both zero until the first
    training batch sets them.
    """

    x_min_max: torch.Tensor

    def __init__(self, bits: int, symmetric: bool, static: bool, momentum: float = 0.95) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(
                f"activation_quantization bits={bits}: only 4 or 8 bits are supported (as DeepSpeed)."
            )
        self.bits, self.symmetric, self.static, self.momentum = bits, symmetric, static, momentum
        self.register_buffer("x_min_max", torch.zeros(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            if not self.static:
                groups = x.numel() // x.shape[-1]
                if self.symmetric:
                    q = quantize_symmetric(x, self.bits, groups)
                else:
                    q = quantize_asymmetric(x, self.bits, groups)
            else:
                if self.training:
                    lo, hi = x.min().to(self.x_min_max), x.max().to(self.x_min_max)
                    if bool(self.x_min_max[0] == self.x_min_max[1]):
                        self.x_min_max.copy_(torch.stack((lo, hi)))
                    m = self.momentum
                    self.x_min_max.mul_(m).add_(torch.stack((lo, hi)), alpha=1 - m)
                lo, hi = self.x_min_max[0].to(x.dtype), self.x_min_max[1].to(x.dtype)
                if self.symmetric:
                    q = quantize_symmetric(x, self.bits, max_abs=torch.maximum(lo.abs(), hi.abs()))
                else:
                    q = quantize_asymmetric(x, self.bits, lo=lo, hi=hi)
        return straight_through(x, q)

    def extra_repr(self) -> str:
        kind = "static" if self.static else "dynamic (per token)"
        return f"bits={self.bits}, symmetric={self.symmetric}, range={kind}"
