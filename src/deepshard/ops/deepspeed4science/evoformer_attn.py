"""``DS4Sci_EvoformerAttention``: Evoformer attention that never holds the whole ``[L, L]`` logits.

AlphaFold's Evoformer attends over one axis of a 2-D representation: MSA row attention (over residues,
with a pair bias), MSA column attention (over sequences), and triangle attention around the starting
and the ending node (over residues, with a triangle bias). All four are one operation on
``Q, K, V: [B, N, L, H, D]`` (attention over ``L`` for each of the ``B * N * H`` slices)::

    out[b, n, i, h] = softmax_j(Q[b, n, i, h] . K[b, n, j, h] / sqrt(D) + sum(biases)[b, n, h, i, j]) @ V[b, n, :, h]

with DeepSpeed's two additive biases: a residue mask ``[B, N, 1, 1, L]`` (``1e9 * (mask - 1)`` or
``-inf``) and a pair / triangle bias ``[B, 1, H, L, L]``.

Memory/compute trade-off. A naive implementation holds ``B*N*H*L*L`` logits, their softmax and (for
backward) both again; at ``(1, 512, 256, 8, 8)`` that is 1 GiB per copy in fp32. Here the forward walks
over chunks of ``(N, query, key)`` with an online softmax (running max and sum per query row) and keeps
only the output and the per-row log-sum-exp ``[B, N, H, L]``; the backward recomputes each chunk's
probabilities from the log-sum-exp. At most one chunk of logits (``max_chunk_elements``, default 2**22
elements) and its few same-sized temporaries are alive at a time, so the extra memory is bounded by the
chunk, not by ``L**2``; the price is the recomputed ``Q K^T`` in backward (about 1.3x the naive FLOPs).

Low precision: bf16/fp16 inputs are computed chunk by chunk in fp32 (softmax statistics, accumulators
and gradients are fp32; results are cast back), so the result is at least as accurate as DeepSpeed's
CUTLASS kernel. Rows whose every key is masked with ``-inf`` give a zero output and zero gradients
instead of NaN. A Triton kernel is not part of this module; this PyTorch path runs on CPU and CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

DEFAULT_CHUNK_ELEMENTS = 1 << 22
"""Logits elements per chunk (16 MiB in fp32): the bound on the ``[L, L]``-shaped memory alive at once."""

_KEY_CHUNK = 1024
_SUPPORTED = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_sizes(batch: int, n: int, lq: int, lk: int, heads: int, max_elements: int) -> tuple[int, int, int]:
    """``(n_chunk, query_chunk, key_chunk)`` such that ``batch*n_chunk*heads*query_chunk*key_chunk <= max_elements``
    (or the smallest possible chunk, one query row of ``key_chunk`` keys, when even that is larger)."""
    per_row = batch * heads
    kc = min(lk, _KEY_CHUNK, max(1, math.isqrt(max_elements // per_row)))  # near-square chunks
    qc = min(lq, max(1, max_elements // (per_row * kc)))
    nc = min(n, max(1, max_elements // (per_row * qc * kc)))
    return nc, qc, kc


def _bias_index(bias: torch.Tensor, ns: slice, qs: slice, ks: slice) -> tuple[slice, ...]:
    # bias: [B|1, N|1, H|1, Lq|1, Lk|1]; a broadcast (size-1) dim is taken whole
    whole = slice(None)
    return (
        whole,
        ns if bias.shape[1] != 1 else whole,
        whole,
        qs if bias.shape[3] != 1 else whole,
        ks if bias.shape[4] != 1 else whole,
    )


def _heads_first(x: torch.Tensor, ns: slice, ls: slice, dtype: torch.dtype) -> torch.Tensor:
    # [B, N, L, H, D] -> the chunk as [B, n, H, l, D] in the compute dtype
    return x[:, ns, ls].transpose(2, 3).to(dtype)


def _logits(
    q: torch.Tensor, k: torch.Tensor, biases: Sequence[torch.Tensor], ns: slice, qs: slice, ks: slice
) -> torch.Tensor:
    s = torch.matmul(q, k.transpose(-1, -2))  # [B, n, H, q, k]; q comes pre-scaled by 1/sqrt(D)
    for bias in biases:
        s.add_(bias[_bias_index(bias, ns, qs, ks)].to(s.dtype))
    return s


def _ranges(total: int, step: int) -> list[slice]:
    return [slice(start, min(start + step, total)) for start in range(0, total, step)]


def evoformer_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, biases: Sequence[torch.Tensor], max_elements: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output ``[B, N, Lq, H, Dv]`` (dtype of ``q``) and log-sum-exp ``[B, N, H, Lq]`` (fp32 or fp64)."""
    b, n, lq, h, d = q.shape
    lk = k.shape[2]
    cdt = _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d)
    out = torch.empty(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, n, h, lq), dtype=cdt, device=q.device)
    nc, qc, kc = chunk_sizes(b, n, lq, lk, h, max_elements)
    for ns in _ranges(n, nc):
        for qs in _ranges(lq, qc):
            qh = _heads_first(q, ns, qs, cdt) * scale
            row_max = torch.full(qh.shape[:-1] + (1,), -math.inf, dtype=cdt, device=q.device)
            row_sum = torch.zeros_like(row_max)
            acc = torch.zeros(qh.shape[:-1] + (v.shape[-1],), dtype=cdt, device=q.device)
            for ks in _ranges(lk, kc):
                s = _logits(qh, _heads_first(k, ns, ks, cdt), biases, ns, qs, ks)
                new_max = torch.maximum(row_max, s.amax(dim=-1, keepdim=True))
                # a row with every key at -inf so far keeps max 0: exp(-inf - 0) = 0, never -inf - -inf
                shift = torch.where(torch.isneginf(new_max), torch.zeros_like(new_max), new_max)
                alpha = torch.exp(row_max - shift)
                p = s.sub_(shift).exp_()
                row_sum.mul_(alpha).add_(p.sum(dim=-1, keepdim=True))
                acc.mul_(alpha).add_(torch.matmul(p, _heads_first(v, ns, ks, cdt)))
                row_max = new_max
                del s, p
            empty = row_sum == 0  # fully masked rows: output 0, lse -inf
            acc.div_(torch.where(empty, torch.ones_like(row_sum), row_sum))
            out[:, ns, qs] = acc.transpose(2, 3).to(q.dtype)
            shift = torch.where(torch.isneginf(row_max), torch.zeros_like(row_max), row_max)
            lse[:, ns, :, qs] = (shift + torch.log(row_sum)).squeeze(-1)
    return out, lse


def evoformer_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    biases: Sequence[torch.Tensor],
    bias_needs_grad: Sequence[bool],
    max_elements: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor | None]]:
    """Gradients of Q, K, V and of each bias (summed over its broadcast dims; ``None`` where not needed)."""
    b, n, lq, h, d = q.shape
    lk = k.shape[2]
    cdt = lse.dtype
    scale = 1.0 / math.sqrt(d)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=cdt, device=k.device)
    dv = torch.zeros(v.shape, dtype=cdt, device=v.device)
    dbias = [
        torch.zeros(x.shape, dtype=cdt, device=x.device) if need else None
        for x, need in zip(biases, bias_needs_grad)
    ]
    # rows with lse = -inf (fully masked) get p = exp(s - inf) = 0
    safe_lse = torch.where(torch.isneginf(lse), torch.full_like(lse, math.inf), lse).unsqueeze(-1)
    nc, qc, kc = chunk_sizes(b, n, lq, lk, h, max_elements)
    for ns in _ranges(n, nc):
        for qs in _ranges(lq, qc):
            qh = _heads_first(q, ns, qs, cdt) * scale  # scaled: dK = ds^T (q * scale)
            go = _heads_first(grad_out, ns, qs, cdt)
            delta = (go * _heads_first(out, ns, qs, cdt)).sum(dim=-1, keepdim=True)  # [B, n, H, q, 1]
            row_lse = safe_lse[:, ns, :, qs]
            dq_acc = torch.zeros_like(qh)
            for ks in _ranges(lk, kc):
                kh = _heads_first(k, ns, ks, cdt)
                vh = _heads_first(v, ns, ks, cdt)
                p = _logits(qh, kh, biases, ns, qs, ks).sub_(row_lse).exp_()  # [B, n, H, q, k]
                dv[:, ns, ks] += torch.matmul(p.transpose(-1, -2), go).transpose(2, 3)
                ds = torch.matmul(go, vh.transpose(-1, -2)).sub_(delta).mul_(p)  # d logits
                del p
                dq_acc.add_(torch.matmul(ds, kh), alpha=scale)
                dk[:, ns, ks] += torch.matmul(ds.transpose(-1, -2), qh).transpose(2, 3)
                for bias, grad in zip(biases, dbias):
                    if grad is not None:
                        dims = [i for i in range(5) if bias.shape[i] == 1 and ds.shape[i] != 1]
                        grad[_bias_index(bias, ns, qs, ks)] += ds.sum(dim=dims, keepdim=True) if dims else ds
                del ds
            dq[:, ns, qs] = dq_acc.transpose(2, 3).to(q.dtype)
    bias_grads = [None if g is None else g.to(x.dtype) for g, x in zip(dbias, biases)]
    return dq, dk.to(k.dtype), dv.to(v.dtype), bias_grads


class EvoformerFusedAttention(torch.autograd.Function):
    """Autograd function over :func:`evoformer_forward` / :func:`evoformer_backward` (DeepSpeed's name).

    ``apply(q, k, v, bias1, bias2, max_chunk_elements)``; either bias may be ``None``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias1: torch.Tensor | None = None,
        bias2: torch.Tensor | None = None,
        max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    ) -> torch.Tensor:
        present = [x for x in (bias1, bias2) if x is not None]
        out, lse = evoformer_forward(q, k, v, present, max_chunk_elements)
        ctx.has_bias = (bias1 is not None, bias2 is not None)
        ctx.max_chunk_elements = max_chunk_elements
        ctx.save_for_backward(q, k, v, out, lse, *present)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        q, k, v, out, lse, *present = ctx.saved_tensors
        needs = [ctx.needs_input_grad[3 + i] for i, has in enumerate(ctx.has_bias) if has]
        dq, dk, dv, dpresent = evoformer_backward(
            grad_out.contiguous(), q, k, v, out, lse, present, needs, ctx.max_chunk_elements
        )
        grads = iter(dpresent)
        db1 = next(grads) if ctx.has_bias[0] else None
        db2 = next(grads) if ctx.has_bias[1] else None
        return dq, dk, dv, db1, db2, None


def _check(name: str, x: torch.Tensor | None, expected: tuple[int, ...]) -> None:
    if x is not None and tuple(x.shape) != expected:
        raise ValueError(f"DS4Sci_EvoformerAttention: {name} has shape {tuple(x.shape)}, expected {expected}")


def DS4Sci_EvoformerAttention(  # noqa: N802 (DeepSpeed's name)
    Q: torch.Tensor,  # noqa: N803
    K: torch.Tensor,  # noqa: N803
    V: torch.Tensor,  # noqa: N803
    biases: Sequence[torch.Tensor | None],
    *,
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Evoformer attention with DeepSpeed's signature and shapes, memory-efficient on any device.

    Args:
        Q, K, V: ``[B, N, L, H, D]`` (attention over ``L``; scaled by ``1/sqrt(D)`` inside), all of one
            dtype among fp32, bf16, fp16 (fp64 for checks).
        biases: up to two additive biases: ``biases[0]`` the mask bias ``[B, N, 1, 1, L]``,
            ``biases[1]`` the pair bias ``[B, 1, H, L, L]``; either may be ``None``. Each gets a gradient
            (summed over its broadcast dims) when it requires one. The list is not modified.
        max_chunk_elements: logits elements computed at once (bounds the extra memory; default 2**22).

    Returns:
        ``[B, N, L, H, D]`` in the dtype of ``Q``.
    """
    if Q.dim() != 5:
        raise ValueError(
            f"DS4Sci_EvoformerAttention: Q must be [B, N, L, H, D] (5 dims), got shape {tuple(Q.shape)}"
        )
    if K.shape != Q.shape or V.shape != Q.shape:
        raise ValueError(
            f"DS4Sci_EvoformerAttention: Q, K and V must have one shape, got {tuple(Q.shape)}, {tuple(K.shape)}, "
            f"{tuple(V.shape)}"
        )
    if Q.dtype not in _SUPPORTED or K.dtype != Q.dtype or V.dtype != Q.dtype:
        raise ValueError(
            f"DS4Sci_EvoformerAttention: Q, K, V must share one dtype among fp32, bf16, fp16 (fp64), got "
            f"{Q.dtype}, {K.dtype}, {V.dtype}"
        )
    if len(biases) > 2:
        raise ValueError(f"DS4Sci_EvoformerAttention: at most 2 biases (mask, pair), got {len(biases)}")
    if max_chunk_elements < 1:
        raise ValueError(
            f"DS4Sci_EvoformerAttention: max_chunk_elements must be >= 1, got {max_chunk_elements}"
        )
    b, n, length, h, _ = Q.shape
    bias1 = biases[0] if len(biases) > 0 else None
    bias2 = biases[1] if len(biases) > 1 else None
    _check("biases[0] (mask bias)", bias1, (b, n, 1, 1, length))
    _check("biases[1] (pair bias)", bias2, (b, 1, h, length, length))
    out: torch.Tensor = EvoformerFusedAttention.apply(Q, K, V, bias1, bias2, max_chunk_elements)
    return out
