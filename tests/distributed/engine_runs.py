"""Training runs shared by the distributed parity tests: the engine on each rank, and the reference.

Not a test module: functions here are pickled by reference and run on the harness's ranks.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

import deepshard
import deepshard.zero
from deepshard.testing.models import GPT, PRESETS
from deepshard.testing.parity import ReferenceResult, make_token_batches, rank_slice, reference_with_bound

STEPS = 20
MICRO = 2
LR = 1e-3
LOSS_TOL = 1e-5
"""Per-step fp32 losses vs the reference, relative. Not derived from the run like the state bound
(:class:`deepshard.testing.parity.ParityBound`): losses move far less than parameters (measured
fp32-vs-float64 deviation <= 3.5e-7 on AVX-512 and AVX2), so the earlier 1e-5 holds on both and stays."""


def _config(gas: int, world: int, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}},
        "gradient_clipping": 0.0,
    }
    cfg.update(extra)
    return cfg


def build_model(unused_and_frozen: bool = False, preset: str = "tiny") -> torch.nn.Module:
    torch.manual_seed(0)
    model = GPT(PRESETS[preset])
    if unused_and_frozen:
        model.blocks[0].ln1.weight.requires_grad_(False)  # frozen
        model.unused = torch.nn.Linear(4, 4)  # never used in forward: gets no gradient
    return model


def param_groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    """Two groups with their own hyper-parameters: matrices decay, vectors do not and learn faster."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0, "lr": 3 * LR},
    ]


def _global_batches(world: int, gas: int, preset: str = "tiny") -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    cfg = PRESETS[preset]
    flat = make_token_batches(cfg.vocab_size, cfg.seq_len, MICRO * world, STEPS * gas, seed=1)
    return [flat[s * gas : (s + 1) * gas] for s in range(STEPS)]


def run_engine(
    world: int,
    gas: int,
    extra: dict[str, Any],
    unused: bool = False,
    use_no_sync: bool = False,
    preset: str = "tiny",
    groups: bool = False,
    unit_classes: tuple[str, ...] = (),
) -> dict:
    """Train with the engine on this rank; return losses, norms and final state (on every rank)."""
    rank = deepshard.comm.get_rank()
    model = build_model(unused, preset)
    if unit_classes:
        deepshard.zero.set_unit_modules(model, unit_classes)
    params = param_groups(model) if groups else model.parameters()
    engine, _, _, _ = deepshard.initialize(model=model, model_parameters=params, config=_config(gas, world, **extra))
    losses, norms, whole_grad_bytes = [], [], []
    for micro_batches in _global_batches(world, gas, preset):
        total = torch.zeros(())
        for i, batch in enumerate(micro_batches):
            x, y = rank_slice(batch, rank, world)
            loss = engine(x, y)
            if use_no_sync and i < len(micro_batches) - 1:
                with engine.no_sync():
                    engine.backward(loss)
            else:
                engine.backward(loss)
            # whole-size gradients alive after backward (stage 2 frees them once reduced)
            whole_grad_bytes.append(
                sum(p.grad.numel() * p.grad.element_size() for p in engine.module.parameters() if p.grad is not None)
            )
            engine.step()
            total += loss.detach().float()
        deepshard.comm.all_reduce(total)
        losses.append(float(total) / (world * len(micro_batches)))
        norms.append(engine.get_global_grad_norm())
    # whole tensors at every stage (stage 3's state_dict() holds this rank's rows)
    state = {k: v.float() for k, v in deepshard.zero.full_state_dict(engine.module).items()}
    return {"losses": losses, "norms": norms, "state": state, "steps": engine.global_steps, "mem": engine.memory_breakdown(),
        "whole_grad_bytes": max(whole_grad_bytes), "live_grad_bytes": engine.reducer.nbytes,
        "shared_params": engine.partition.shared is not None,
        "reducer": type(engine.reducer).__name__}


def run_engine_over_collectives(*args: Any) -> dict:
    """:func:`run_engine` with host shared memory off: parameters all-gathered over gloo collectives."""
    import os

    os.environ["DEEPSHARD_HOST_SHM"] = "0"
    try:
        return run_engine(*args)
    finally:
        del os.environ["DEEPSHARD_HOST_SHM"]


def replaced_storage_error() -> str:
    """Replace a parameter's storage after initialize at stage 2 (shared parameters): the step must refuse."""
    model = build_model()
    engine, _, _, _ = deepshard.initialize(model=model, config=_config(1, deepshard.comm.get_world_size(),
                                           zero_optimization={"stage": 2}))  # fmt: skip
    first = next(engine.module.parameters())
    first.data = first.data.clone()
    x, y = rank_slice(_global_batches(deepshard.comm.get_world_size(), 1)[0][0], deepshard.comm.get_rank(), 2)
    engine.backward(engine(x, y))
    try:
        engine.step()
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def assert_parity(results: list[dict], ref: ReferenceResult, norms: bool = True) -> None:
    """Every rank's losses (``LOSS_TOL``), norms and final state (the reference's measured bound) match
    the reference; ranks agree exactly."""
    from deepshard.testing.parity import max_relative_difference, max_state_difference

    assert ref.bound is not None
    for r in results:
        assert r["steps"] == STEPS
        assert max_relative_difference(r["losses"], ref.losses) <= LOSS_TOL
        if norms:
            assert max_relative_difference(r["norms"], ref.grad_norms) <= ref.bound.norms
        assert max_state_difference(r["state"], ref.state) <= ref.bound.state
    assert max_state_difference(results[-1]["state"], results[0]["state"]) == 0.0


@functools.cache
def reference(
    world: int, gas: int, clip: float = 0.0, unused: bool = False, preset: str = "tiny", groups: bool = False
) -> ReferenceResult:
    """The single-process PyTorch run the engine must match, with its measured fp32 :class:`ParityBound`.

    Cached: many tests compare against the same reference (callers must not modify it).
    """

    def build(dtype: torch.dtype) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = build_model(unused, preset).to(dtype)
        params: Any = param_groups(model) if groups else [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=LR, weight_decay=0.01, foreach=False)

    return reference_with_bound(build, _global_batches(world, gas, preset), world, clip=clip)


