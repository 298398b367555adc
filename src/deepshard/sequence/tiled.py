"""Tiled compute for long sequences (ALST): an MLP and the logits + loss, one sequence tile at a time.

For a long sequence the largest activations are not the attention's but the MLP's ``[s, 4h]``-wide
hidden and, above all, the ``[s, vocab]`` logits (2048 tokens x 49152 vocab = 400 MB in fp32, twice
with their gradient). Both ops are independent per token, so they are computed over ``shards`` tiles of
the sequence: the forward keeps only the input, the backward recomputes one tile at a time. Peak extra
memory drops from ``O(s * width)`` to ``O(s * width / shards)`` for one extra forward of the op.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def _tiles(total: int, shards: int) -> list[slice]:
    if shards < 1:
        raise ValueError(f"tiled compute: shards must be >= 1, got {shards}")
    step = -(-total // shards)
    return [slice(start, min(start + step, total)) for start in range(0, total, step)]


class TiledMLP(torch.autograd.Function):
    """``TiledMLP.apply(fn, module, x, shards, compute_params=None)``: ``fn(module, x)`` over sequence tiles.

    ``x`` is ``[b, s, h]`` (tiles along dim 1, DeepSpeed's layout) or ``[s, h]``. ``fn`` must act on each
    token independently (an MLP). Gradients of ``module``'s parameters accumulate into their ``.grad``
    during the tiled backward (as with DeepSpeed's TiledMLP), so use ``loss.backward()``, not
    ``torch.autograd.grad`` with parameters as inputs. ``compute_params`` (DeepSpeed's ZeRO-3 hint) is
    not implemented: pass ``None``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        fn: Callable[[Any, torch.Tensor], torch.Tensor],
        module: Any,
        x: torch.Tensor,
        shards: int,
        compute_params: Any = None,
    ) -> torch.Tensor:
        if compute_params is not None:
            raise ValueError(
                "TiledMLP: compute_params (ZeRO-3 parameter hints) is not implemented; pass None"
            )
        dim = 1 if x.dim() == 3 else 0
        ctx.fn, ctx.module, ctx.shards, ctx.dim = fn, module, shards, dim
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat(
                [fn(module, x.narrow(dim, t.start, t.stop - t.start)) for t in _tiles(x.shape[dim], shards)],
                dim=dim,
            )

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        dim = ctx.dim
        dx = torch.empty_like(x) if ctx.needs_input_grad[2] else None
        for t in _tiles(x.shape[dim], ctx.shards):
            xs = x.narrow(dim, t.start, t.stop - t.start).detach().requires_grad_(dx is not None)
            with torch.enable_grad():
                out = ctx.fn(ctx.module, xs)
            torch.autograd.backward(out, grad.narrow(dim, t.start, t.stop - t.start))
            if dx is not None:
                dx.narrow(dim, t.start, t.stop - t.start).copy_(xs.grad)
        return None, None, dx, None, None


class TiledLogitsLoss(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weight.T`` against ``labels``, never holding ``[tokens, vocab]`` whole.

    ``apply(hidden [N, h], weight [V, h], labels [N], shards, ignore_index)``. Each tile's logits are
    computed in fp32; the backward recomputes them and forms ``(softmax - onehot) / n_valid`` directly.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        shards: int,
        ignore_index: int,
    ) -> torch.Tensor:
        valid = labels != ignore_index
        count = int(valid.sum())
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32 logits for bf16/fp16
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for t in _tiles(hidden.shape[0], shards):
            logits = (hidden[t] @ weight.T).to(acc)
            total += torch.nn.functional.cross_entropy(
                logits, labels[t], ignore_index=ignore_index, reduction="sum"
            )
            del logits
        ctx.save_for_backward(hidden, weight, labels)
        ctx.shards, ctx.ignore_index, ctx.count = shards, ignore_index, count
        return (total / max(count, 1)).to(hidden.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        hidden, weight, labels = ctx.saved_tensors
        dh = torch.empty_like(hidden)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        scale = grad.to(acc) / max(ctx.count, 1)
        for t in _tiles(hidden.shape[0], ctx.shards):
            dlogits = torch.softmax((hidden[t] @ weight.T).to(acc), dim=-1)  # [tile, V]
            lab = labels[t]
            valid = lab != ctx.ignore_index
            rows = torch.nonzero(valid).squeeze(-1)
            dlogits[rows, lab[rows]] -= 1.0
            dlogits.mul_(valid.unsqueeze(-1) * scale)
            dh[t] = (dlogits @ weight.to(acc)).to(hidden.dtype)
            dw.addmm_(dlogits.T, hidden[t].to(acc))
            del dlogits
        return dh, dw.to(weight.dtype), None, None, None


def tiled_logits_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    shards: int = 8,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of the LM head ``hidden @ weight.T`` over tokens whose label is not ``ignore_index``.

    ``hidden``: ``[..., h]`` (flattened to tokens), ``weight``: ``[vocab, h]``, ``labels``: ``hidden``'s
    leading shape. Peak extra memory is one tile of ``[tokens / shards, vocab]`` fp32 logits (plus its
    softmax in backward) instead of the whole logits.
    """
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"tiled_logits_loss: labels shape {tuple(labels.shape)} must be hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    flat = hidden.reshape(-1, hidden.shape[-1])
    out: torch.Tensor = TiledLogitsLoss.apply(flat, weight, labels.reshape(-1), shards, ignore_index)
    return out
