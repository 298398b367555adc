"""The fused decoder's elementwise pieces in plain PyTorch: norms, residual+norm, rotary in place.

Each function computes exactly what the Hugging Face modules compute, in the same order of floating
point operations where that is cheap (so fp32 results agree to the last bits, not merely closely);
they are the reference a faster kernel (``torch.compile`` fuses them) is checked against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x**2) + eps)``, the statistics in fp32 (as Llama's ``LlamaRMSNorm``)."""

    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.detach(), requires_grad=False)  # shares the source model's storage
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def add_norm(x: torch.Tensor, residual: torch.Tensor, norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then norm in one step: returns ``(norm(residual + x), residual + x)``.

    The pre-norm decoder carries the residual stream separately, so each layer boundary is one
    add+norm (a single fused kernel under ``torch.compile``) instead of an add, a store and a norm.
    """
    summed = residual + x
    return norm(summed), summed


class Rotary(nn.Module):
    """Rotary position tables: ``inv_freq`` ``[D/2]`` and the model's ``attention_scaling``."""

    inv_freq: torch.Tensor

    def __init__(self, inv_freq: torch.Tensor, attention_scaling: float) -> None:
        super().__init__()
        self.register_buffer("inv_freq", inv_freq.detach().to(torch.float32).clone(), persistent=False)
        self.attention_scaling = attention_scaling

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos, sin`` of shape ``[B, T, 1, D/2]`` for ``positions`` ``[B, T]``, cast to ``dtype`` (as HF does)."""
        freqs = positions[..., None].to(torch.float32) * self.inv_freq.to(positions.device)
        cos = (freqs.cos() * self.attention_scaling).to(dtype)
        sin = (freqs.sin() * self.attention_scaling).to(dtype)
        return cos[:, :, None, :], sin[:, :, None, :]


def rotate_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Apply rotary embedding (the half-split layout of Llama) to ``x`` ``[B, T, heads, D]`` in place.

    ``x`` is a view into the fused QKV output, so queries and keys are rotated where they are without
    the ``cat`` of ``rotate_half``. Per element the arithmetic is HF's: ``x1*cos - x2*sin`` and
    ``x2*cos + x1*sin``, each product rounded before the sum.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    first = x1 * cos - x2 * sin
    second = x2 * cos + x1 * sin
    x1.copy_(first)
    x2.copy_(second)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """``scaled_dot_product_attention`` of ``q`` ``[B, H, T, D]`` over ``k, v`` ``[B, KV, L, D]`` (``KV`` divides ``H``).

    ``mask`` is boolean (True: attend) broadcastable to ``[B, H, T, L]``, or ``None`` for all-visible.
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
