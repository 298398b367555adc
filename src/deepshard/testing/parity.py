"""Single-process references for parity tests: same seed, same data, plain PyTorch.

A distributed run with ``world`` ranks, micro-batch ``m`` and ``gas`` accumulation steps sees, per
optimizer step, ``world * m * gas`` samples. The reference takes the same samples as one batch per
micro-step index and averages exactly as data parallelism does, so losses and parameters must agree
up to floating-point reordering.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def make_token_batches(vocab: int, seq_len: int, batch: int, count: int, seed: int = 0) -> list[Batch]:
    """``count`` batches of ``batch`` random token rows: ``(input, target)`` shifted by one."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        rows = torch.randint(0, vocab, (batch, seq_len + 1), generator=gen)
        out.append((rows[:, :-1].contiguous(), rows[:, 1:].contiguous()))
    return out


def rank_slice(batch: Batch, rank: int, world: int) -> Batch:
    """Rank ``rank``'s contiguous share of a global batch."""
    x, y = batch
    per = x.shape[0] // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def train_engine(engine: Any, global_batches: list[Batch]) -> list[float]:
    """One engine step per global batch (this rank's slice); the per-step loss averaged over ranks."""
    import deepshard

    world, rank = deepshard.comm.get_world_size(), deepshard.comm.get_rank()
    losses = []
    for batch in global_batches:
        x, y = rank_slice(batch, rank, world)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        total = loss.detach().float().clone()
        deepshard.comm.all_reduce(total)
        losses.append(float(total) / world)
    return losses


@dataclass
class ReferenceResult:
    """Per-step mean losses, per-step global gradient norms, and final parameters."""

    losses: list[float]
    grad_norms: list[float]
    state: dict[str, torch.Tensor]


def reference_train(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    global_batches: list[list[Batch]],
    clip: float = 0.0,
    scheduler: object | None = None,
) -> ReferenceResult:
    """Train ``model`` in one process. ``global_batches[step]`` lists that step's micro-batches.

    Each micro-batch's loss is divided by the number of micro-batches (gradient accumulation); the
    global norm is taken before clipping, and clipping uses ``clip / (norm + 1e-6)`` as DeepSpeed does.
    A trainable parameter that got no gradient gets a zero one, as in DeepSpeed's data-parallel
    reduction (so weight decay still applies to it).
    """
    losses, norms = [], []
    for micro_batches in global_batches:
        total = 0.0
        for x, y in micro_batches:
            loss = model(x, y)
            (loss / len(micro_batches)).backward()
            total += float(loss.detach())
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))
        norms.append(norm)
        if clip > 0:
            coef = clip / (norm + 1e-6)
            if coef < 1:
                for g in grads:
                    g.mul_(coef)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()  # type: ignore[attr-defined]
        losses.append(total / len(micro_batches))
    return ReferenceResult(losses, norms, {k: v.detach().clone() for k, v in model.state_dict().items()})


def max_relative_difference(a: list[float], b: list[float]) -> float:
    """``max |a_i - b_i| / max(|b_i|, 1e-12)`` over paired values."""
    if len(a) != len(b):
        raise ValueError(f"sequences differ in length: {len(a)} vs {len(b)}")
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def max_state_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest per-tensor relative difference ``||a - b||_2 / max(||b||_2, 1e-12)`` over shared names.

    A norm-wise measure: Adam turns rounding noise in near-zero gradients into learning-rate-sized
    moves of single elements, which an element-wise maximum would report as divergence.
    """
    worst = 0.0
    for name, ref in b.items():
        diff = float(torch.linalg.vector_norm(a[name].float() - ref.float()))
        worst = max(worst, diff / max(float(torch.linalg.vector_norm(ref.float())), 1e-12))
    return worst


ModelFactory = Callable[[], torch.nn.Module]
