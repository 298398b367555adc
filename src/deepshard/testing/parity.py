"""Single-process references for parity tests: same seed, same data, plain PyTorch.

A distributed run with ``world`` ranks, micro-batch ``m`` and ``gas`` accumulation steps sees, per
optimizer step, ``world * m * gas`` samples. The reference takes the same samples as one batch per
micro-step index and averages exactly as data parallelism does, so losses and parameters must agree
up to floating-point reordering.

How much reordering may move a result is measured, not guessed: :func:`reference_with_bound` runs the
same reference three times (fp32, fp32 in data-parallel order, float64) and derives from their
differences the :class:`ParityBound` a correct distributed fp32 run stays within on any IEEE-754 CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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


def data_parallel_order(global_batches: list[list[Batch]], world: int) -> list[list[Batch]]:
    """The same samples in the order ``world`` data-parallel ranks reduce them.

    Each micro-batch becomes ``world`` micro-batches (rank ``r``'s :func:`rank_slice`), so
    :func:`reference_train` averages per-slice means, as an all-reduce of per-rank gradients does,
    instead of taking one mean over the whole batch. Equal slices keep the exact value unchanged; only
    the rounding differs.
    """
    return [[rank_slice(b, r, world) for b in micro for r in range(world)] for micro in global_batches]


@dataclass
class ReferenceResult:
    """Per-step mean losses, per-step global gradient norms, and final parameters.

    ``bound`` is set by :func:`reference_with_bound`: how far a correct fp32 run may differ.
    """

    losses: list[float]
    grad_norms: list[float]
    state: dict[str, torch.Tensor]
    bound: ParityBound | None = None


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
        # fp32 at least (bf16/fp16 gradients), float64 kept for the float64 reference
        norms_each = [torch.linalg.vector_norm(g.to(torch.promote_types(g.dtype, torch.float32))) for g in grads]
        norm = float(torch.linalg.vector_norm(torch.stack(norms_each)))
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
        # the difference in float64, so a float64 reference is compared without first rounding it
        diff = float(torch.linalg.vector_norm(a[name].double() - ref.double()))
        worst = max(worst, diff / max(float(torch.linalg.vector_norm(ref.double())), 1e-12))
    return worst


KAPPA = 2.0
"""How much larger than the measured reference deviations an engine's own deviation may be.

Two fp32 runs of one computation in different summation orders make different roundings of the
same size (each of the same operations rounds by at most 2**-24 relative); what reaches the final
state is that noise propagated through the same training dynamics, so their deviations from exact
arithmetic are samples of one distribution. Across the parity cases of this suite, on an AVX-512
Xeon/EPYC and in AVX2 mode (``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2
ONEDNN_MAX_CPU_ISA=AVX2``), the engine's deviation was at most 1.24x the larger of the two reference
deviations; 2 leaves room for that spread without admitting a real error: on the tiny test GPT
(bound 2.4e-5) a 1% learning-rate error moves the state by 1.2e-2, dropping weight decay (0.01) by
2.1e-4, one reordered step by 0.18, one rank's samples lost by 1.1 (tests/unit/test_parity_bound.py).
"""


@dataclass(frozen=True)
class Deviation:
    """How far one fp32 run is from the float64 run: final state and per-step gradient norms."""

    state: float
    norms: float


@dataclass(frozen=True)
class ParityBound:
    """Tolerances for comparing a distributed fp32 run ``E`` with the fp32 reference ``R``.

    Derivation. Let ``T`` be the exact trajectory, approximated by the float64 run (its own rounding is
    2**-29 times smaller, ~1e-13, and is ignored). By the triangle inequality
    ``d(E, R) <= d(E, T) + d(R, T)``. ``d(R, T)`` is measured (``fp32``). ``E`` is another correct
    fp32 evaluation in another order, so ``d(E, T) <= KAPPA * max(d(R, T), d(R', T))`` where ``R'`` is
    the reference recomputed in data-parallel order (``reordered``): the measured spread of correct
    orderings. Hence ``bound = d(R, T) + KAPPA * max(d(R, T), d(R', T))``, for the state
    (:func:`max_state_difference`) and the gradient norms (:func:`max_relative_difference`) alike.
    """

    fp32: Deviation
    reordered: Deviation

    @property
    def state(self) -> float:
        """Bound for ``max_state_difference(engine_state, reference.state)``."""
        return self.fp32.state + KAPPA * max(self.fp32.state, self.reordered.state)

    @property
    def norms(self) -> float:
        """Bound for ``max_relative_difference(engine_norms, reference.grad_norms)``."""
        return self.fp32.norms + KAPPA * max(self.fp32.norms, self.reordered.norms)


def reference_with_bound(
    build: Callable[[torch.dtype], tuple[nn.Module, torch.optim.Optimizer]],
    global_batches: list[list[Batch]],
    world: int,
    clip: float = 0.0,
) -> ReferenceResult:
    """The fp32 reference of :func:`reference_train`, with its :class:`ParityBound` measured.

    ``build(dtype)`` returns a freshly seeded model in ``dtype`` and its optimizer; it is called for
    float32 twice (as given, and in :func:`data_parallel_order` over ``max(world, 2)`` slices, so even
    one rank's bound sees a second order) and once for float64. Costs three reference runs.
    """
    fp32 = reference_train(*build(torch.float32), global_batches, clip=clip)
    reordered = reference_train(*build(torch.float32), data_parallel_order(global_batches, max(world, 2)), clip=clip)
    exact = reference_train(*build(torch.float64), global_batches, clip=clip)

    def deviation(run: ReferenceResult) -> Deviation:
        return Deviation(
            max_state_difference(run.state, exact.state), max_relative_difference(run.grad_norms, exact.grad_norms)
        )

    fp32.bound = ParityBound(deviation(fp32), deviation(reordered))
    return fp32


ModelFactory = Callable[[], torch.nn.Module]
