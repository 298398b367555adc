"""The fused transformer layer every injected architecture is converted to.

One QKV matmul, rotary applied in place on its output, ``scaled_dot_product_attention`` over the
preallocated KV cache, one gate/up matmul (gated MLPs), and the residual add fused with the next norm.
What differs between architectures is data in :class:`LayerShape` and the modules handed in (norm
kind, activation, biases), not code paths per model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from deepshard.inference.kv_cache import StepBatch
from deepshard.inference.ops import add_norm, attention, rotate_in_place
from deepshard.inference.paged import RaggedBatch


@dataclass(frozen=True)
class LayerShape:
    """Head layout and attention options of one layer."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    window: int | None = None
    """Sliding-window length (Mistral, Qwen2's sliding layers): a query sees the last ``window`` positions."""


def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A frozen ``nn.Linear`` over ``weight`` ``[out, in]`` and ``bias``, sharing their storage (no copy)."""
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    out.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return out


def fuse_linears(parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> nn.Linear:
    """One ``nn.Linear`` computing several projections of the same input: weights stacked on the output dim.

    A bias missing from some parts (but present in others) is zero there.
    """
    weight = torch.cat([w for w, _ in parts], dim=0)
    if all(b is None for _, b in parts):
        return linear(weight, None)
    bias = torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for w, b in parts])
    return linear(weight, bias)


class FusedAttention(nn.Module):
    """Self-attention with a fused QKV projection; keys/values go to the KV cache when one is given."""

    def __init__(self, shape: LayerShape, qkv: nn.Linear, out: nn.Linear) -> None:
        super().__init__()
        self.shape = shape
        self.qkv = qkv
        self.o_proj = out

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None,
        batch: StepBatch | RaggedBatch | None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` ``[B, T, hidden]`` -> ``[B, T, hidden]``.

        With ``cache`` (this layer's key/value tensors) and ``batch``, the new keys/values are stored and
        the attended keys are the sequences' prefixes (causal): slots of a :class:`KVCache` for a
        :class:`StepBatch`, blocks of a paged cache for a :class:`RaggedBatch` (``B = 1``, ``T = N``
        flattened tokens); without, ``mask`` (``[B, 1, 1, T]``, True:
        attend, or ``None``) is a bidirectional padding mask (encoders).
        """
        s = self.shape
        b, t, _ = x.shape
        heads = self.qkv(x).view(b, t, s.num_heads + 2 * s.num_kv_heads, s.head_dim)
        if rope is not None:
            rotate_in_place(heads[:, :, : s.num_heads + s.num_kv_heads], *rope)
        q = heads[:, :, : s.num_heads].transpose(1, 2)
        k = heads[:, :, s.num_heads : s.num_heads + s.num_kv_heads].transpose(1, 2)
        v = heads[:, :, s.num_heads + s.num_kv_heads :].transpose(1, 2)
        if cache is not None:
            assert batch is not None, "a cached forward needs the StepBatch / RaggedBatch that places its tokens"
            out = batch.attend(q, k, v, cache, s.scale, s.window)
        else:
            out = attention(q, k, v, mask, s.scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, s.num_heads * s.head_dim))


class FusedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))`` with gate and up in one matmul (gated), or ``down(act(up(x)))``."""

    def __init__(self, up: nn.Linear, act: nn.Module, down: nn.Linear, *, gated: bool) -> None:
        super().__init__()
        self.up = up
        self.act = act
        self.down = down
        self.gated = gated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            return self.down(self.act(gate) * up)
        return self.down(self.act(h))


class FusedLayer(nn.Module):
    """A transformer block. Pre-norm blocks carry the residual stream beside the hidden state.

    Pre-norm (``pre_norm=True``): ``forward(h, residual)`` where the stream is ``h + residual``
    (``residual=None`` at the first layer) returns the new ``(h, residual)``; every add is fused with
    the norm after it (:func:`~deepshard.inference.ops.add_norm`), the last one with the final norm.
    Post-norm (OPT-350m, BERT): ``h = norm1(h + attn(h)); h = norm2(h + mlp(h))``; ``residual`` is unused.
    """

    def __init__(
        self, attn_norm: nn.Module, attn: FusedAttention, mlp_norm: nn.Module, mlp: FusedMLP, *, pre_norm: bool
    ) -> None:
        super().__init__()
        self.attn_norm = attn_norm
        self.attn = attn
        self.mlp_norm = mlp_norm
        self.mlp = mlp
        self.pre_norm = pre_norm

    def forward(
        self,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: tuple[torch.Tensor, torch.Tensor] | None,
        batch: StepBatch | RaggedBatch | None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.pre_norm:
            h = self.attn_norm(h + self.attn(h, rope, cache, batch, mask))
            return self.mlp_norm(h + self.mlp(h)), None
        if residual is None:
            residual, x = h, self.attn_norm(h)
        else:
            x, residual = add_norm(h, residual, self.attn_norm)
        x, residual = add_norm(self.attn(x, rope, cache, batch, mask), residual, self.mlp_norm)
        return self.mlp(x), residual
