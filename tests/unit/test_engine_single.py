"""The engine in one process without a process group (world size 1), against plain PyTorch references.

Covers DeepSpeed's engine API: accumulation boundaries and counters, ``backward`` scaling, norms and
clipping, ``no_sync``, fp16 overflow skipping with the dynamic loss scaler, bf16 master weights,
client optimizers and schedulers, config sources, data loaders and ``memory_breakdown``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import deepshard
from deepshard.config import ConfigError

LAUNCHER_VARS = (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
    "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "PMIX_SIZE",
    "SLURM_PROCID", "SLURM_NTASKS",
)  # fmt: skip


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """No launcher variables and no process group: the world-size-1 code path."""
    for key in LAUNCHER_VARS:
        monkeypatch.delenv(key, raising=False)
    assert not torch.distributed.is_initialized()
    yield
    assert not torch.distributed.is_initialized(), "a world-1 engine must not create a process group"


class MLP(nn.Module):
    """4 -> 8 -> 2 regression model; ``forward(x, y)`` returns the MSE loss (computed in fp32)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = self.fc2(torch.tanh(self.fc1(x.to(self.fc1.weight.dtype))))  # DeepSpeed does not cast inputs
        return F.mse_loss(out.float(), y)


PSI = 4 * 8 + 8 + 8 * 2 + 2  # 58 parameters
N_TENSORS = 4
LR = 0.1


def _model(seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    return MLP()


def _batches(n: int, micro: int = 2, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(micro, 4, generator=gen), torch.randn(micro, 2, generator=gen)) for _ in range(n)]


def _config(gas: int = 1, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "SGD", "params": {"lr": LR}},
    }
    cfg.update(extra)
    return cfg


def _engine(gas: int = 1, model: nn.Module | None = None, **extra: Any):
    model = model if model is not None else _model()
    engine, *_ = deepshard.initialize(
        model=model, model_parameters=model.parameters(), config=_config(gas, **extra)
    )
    return engine


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _reference_sgd_step(model: nn.Module, micro_batches, clip: float = 0.0) -> float:
    """One SGD step on the mean loss of ``micro_batches``; returns the pre-clipping global grad norm."""
    for x, y in micro_batches:
        (model(x, y) / len(micro_batches)).backward()
    grads = [p.grad for p in model.parameters()]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    coef = clip / (norm + 1e-6) if clip > 0 else 1.0
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * min(coef, 1.0) * p.grad
            p.grad = None
    return norm


def _assert_close_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].float(), b[k].float(), atol=atol, rtol=0, msg=k)


# ---------------------------------------------------------------------------------------------------- basics
def test_engine_wraps_module_and_reports_config():
    model = _model()
    engine, optimizer, loader, scheduler = deepshard.initialize(model=model, config=_config(gas=3))
    assert isinstance(engine, deepshard.DeepSpeedEngine)
    assert engine.module is model
    assert optimizer is engine.optimizer and isinstance(optimizer, torch.optim.SGD)
    assert loader is None and scheduler is None
    assert engine.train_micro_batch_size_per_gpu() == 2
    assert engine.gradient_accumulation_steps() == 3
    assert engine.train_batch_size() == 6
    assert engine.gradient_clipping() == 0.0
    assert engine.zero_optimization_stage() == 0
    assert not engine.fp16_enabled() and not engine.bfloat16_enabled()
    assert engine.get_lr() == [LR]
    assert engine.get_global_grad_norm() is None
    assert (engine.micro_steps, engine.global_steps, engine.global_samples, engine.skipped_steps) == (
        0,
        0,
        0,
        0,
    )


def test_train_eval_toggle_the_module():
    engine = _engine()
    engine.eval()
    assert not engine.module.training and not engine.training
    engine.train()
    assert engine.module.training and engine.training


def test_forward_returns_module_output():
    model = _model()
    ref = copy.deepcopy(model)
    engine = _engine(model=model)
    x, y = _batches(1)[0]
    assert torch.equal(engine(x, y), ref(x, y))


# ---------------------------------------------------------------------------------------------------- accumulation
def test_accumulation_boundaries_and_counters():
    engine = _engine(gas=3)
    seen = []
    for x, y in _batches(6):
        boundary = engine.is_gradient_accumulation_boundary()
        engine.backward(engine(x, y))
        engine.step()
        seen.append(
            (
                boundary,
                engine.was_step_applied(),
                engine.micro_steps,
                engine.global_steps,
                engine.global_samples,
            )
        )
    assert seen == [
        (False, False, 1, 0, 0),
        (False, False, 2, 0, 0),
        (True, True, 3, 1, 6),
        (False, False, 4, 1, 6),
        (False, False, 5, 1, 6),
        (True, True, 6, 2, 12),
    ]


def test_backward_divides_by_gas_and_matches_reference():
    model = _model()
    ref = copy.deepcopy(model)
    engine = _engine(gas=2, model=model)
    batches = _batches(2)

    x, y = batches[0]
    loss = engine(x, y)
    returned = engine.backward(loss)
    assert torch.allclose(returned, loss / 2)
    ref_loss = ref(x, y)
    ref_loss.backward()
    for p, q in zip(engine.module.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad / 2)
    ref.zero_grad(set_to_none=True)

    engine.step()
    assert not engine.was_step_applied()
    x, y = batches[1]
    engine.backward(engine(x, y))
    engine.step()
    assert engine.was_step_applied()

    norm = _reference_sgd_step(ref, batches)
    _assert_close_state(_state(engine.module), _state(ref))
    assert math.isclose(engine.get_global_grad_norm(), norm, rel_tol=1e-5)


def test_backward_without_gas_scaling():
    model = _model()
    ref = copy.deepcopy(model)
    engine = _engine(gas=4, model=model)
    x, y = _batches(1)[0]
    loss = engine(x, y)
    assert torch.equal(engine.backward(loss, scale_wrt_gas=False), loss)
    ref(x, y).backward()
    for p, q in zip(engine.module.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_set_gradient_accumulation_boundary_documented_pattern():
    # DeepSpeed's docstring pattern: boundary False for all but the last micro-batch, step() once.
    model = _model()
    ref = copy.deepcopy(model)
    engine = _engine(gas=3, model=model)
    batches = _batches(3)
    engine.set_gradient_accumulation_boundary(False)
    for x, y in batches[:2]:
        assert not engine.is_gradient_accumulation_boundary()
        engine.backward(engine(x, y))
    engine.set_gradient_accumulation_boundary(True)
    x, y = batches[2]
    assert engine.is_gradient_accumulation_boundary()
    engine.backward(engine(x, y))
    engine.step()
    assert engine.was_step_applied()
    assert (engine.global_steps, engine.micro_steps) == (1, 1)
    _reference_sgd_step(ref, batches)
    _assert_close_state(_state(engine.module), _state(ref))


def test_set_gradient_accumulation_boundary_persists_like_deepspeed():
    # DeepSpeed keeps the override until it is set again (it is not reset by step()).
    engine = _engine(gas=1)
    engine.set_gradient_accumulation_boundary(False)
    applied = []
    for x, y in _batches(3):
        engine.backward(engine(x, y))
        engine.step()
        applied.append(engine.was_step_applied())
    assert applied == [False, False, False]
    assert engine.is_gradient_accumulation_boundary() is False


def test_clipping_matches_reference():
    model = _model()
    ref = copy.deepcopy(model)
    clip = 1e-3
    engine = _engine(gas=2, model=model, gradient_clipping=clip)
    batches = _batches(2)
    for x, y in batches:
        engine.backward(engine(x, y))
        engine.step()
    norm = _reference_sgd_step(ref, batches, clip=clip)
    assert norm > 10 * clip, "clipping must be active for this test to mean anything"
    assert math.isclose(engine.get_global_grad_norm(), norm, rel_tol=1e-5)  # reported before clipping
    _assert_close_state(_state(engine.module), _state(ref))


def test_zero_grad_clears_accumulated_gradients():
    engine = _engine(gas=2)
    before = _state(engine.module)
    x, y = _batches(1)[0]
    engine.backward(engine(x, y))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in engine.module.parameters())
    engine.zero_grad()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in engine.module.parameters())
    engine.step()
    engine.step()  # boundary with zero gradients: SGD without decay leaves the parameters
    assert engine.global_steps == 1
    _assert_close_state(_state(engine.module), before, atol=0)


def test_gradients_are_zeroed_after_a_step():
    engine = _engine()
    x, y = _batches(1)[0]
    engine.backward(engine(x, y))
    engine.step()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in engine.module.parameters())


# ---------------------------------------------------------------------------------------------------- no_sync
def test_no_sync_forbids_step_and_nesting():
    engine = _engine()
    x, y = _batches(1)[0]
    with engine.no_sync():
        engine.backward(engine(x, y))
        with pytest.raises(
            ValueError, match=r"step\(\) was called inside no_sync\(\); leave the no_sync\(\) block"
        ):
            engine.step()
        with pytest.raises(ValueError, match="already active; it cannot be nested"), engine.no_sync():
            pass
    assert engine.micro_steps == 0
    engine.step()  # allowed again once the block is left
    assert engine.global_steps == 1


def test_no_sync_is_left_cleanly_after_an_exception():
    engine = _engine()
    with pytest.raises(RuntimeError, match="boom"), engine.no_sync():
        raise RuntimeError("boom")
    with engine.no_sync():  # would raise "already active" if the flag leaked
        pass


def test_no_sync_accumulates_like_accumulation():
    model = _model()
    ref = copy.deepcopy(model)
    engine = _engine(gas=1, model=model)
    batches = _batches(2)
    with engine.no_sync():
        engine.backward(engine(*batches[0]))
    engine.backward(engine(*batches[1]))
    engine.step()
    # gas=1: each loss is unscaled, so the step sees the sum of both micro-batch gradients
    for x, y in batches:
        ref(x, y).backward()
    with torch.no_grad():
        for p in ref.parameters():
            p -= LR * p.grad
    _assert_close_state(_state(engine.module), _state(ref))


# ---------------------------------------------------------------------------------------------------- fp16
def _inf_hook(grad: torch.Tensor) -> torch.Tensor:
    return torch.full_like(grad, float("inf"))


def test_fp16_overflow_skips_step_and_backs_off_after_hysteresis():
    fp16 = {"enabled": True, "initial_scale_power": 8, "hysteresis": 2, "loss_scale_window": 1000}
    sched = {
        "type": "WarmupLR",
        "params": {
            "warmup_min_lr": 0.01,
            "warmup_max_lr": 0.1,
            "warmup_num_steps": 10,
            "warmup_type": "linear",
        },
    }
    engine = _engine(fp16=fp16, scheduler=sched)
    assert engine.fp16_enabled()
    assert all(p.dtype == torch.float16 for p in engine.module.parameters())
    assert engine.get_loss_scale() == 256.0
    batches = _batches(3)
    before = _state(engine.module)
    lr0 = engine.get_lr()
    assert engine.lr_scheduler.last_batch_iteration == -1

    handle = engine.module.fc1.weight.register_hook(_inf_hook)
    for i, (x, y) in enumerate(batches[:2]):
        engine.backward(engine(x, y))
        engine.step()
        assert not engine.was_step_applied()
        assert engine.skipped_steps == i + 1
        assert engine.global_steps == i + 1  # a skipped step still counts, as in DeepSpeed
        _assert_close_state(_state(engine.module), before, atol=0)  # parameters untouched
        assert engine.get_lr() == lr0  # the schedule does not advance on a skipped step
        assert engine.lr_scheduler.last_batch_iteration == -1
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in engine.module.parameters())
        # hysteresis 2: the first overflow only spends hysteresis, the second halves the scale
        assert engine.get_loss_scale() == (256.0 if i == 0 else 128.0)
    handle.remove()
    assert not engine.optimizer.state or all(not s for s in engine.optimizer.state.values())

    engine.backward(engine(*batches[2]))
    engine.step()
    assert engine.was_step_applied()
    assert engine.skipped_steps == 2 and engine.global_steps == 3
    assert engine.get_loss_scale() == 128.0
    assert engine.lr_scheduler.last_batch_iteration == 0
    assert any(not torch.equal(v, before[k]) for k, v in _state(engine.module).items())


def test_fp16_good_step_unscales_gradients():
    model = _model()
    ref = copy.deepcopy(model)
    engine = _engine(model=model, fp16={"enabled": True, "initial_scale_power": 10})
    x, y = _batches(1)[0]
    engine.backward(engine(x, y))
    engine.step()
    assert engine.was_step_applied()
    norm = _reference_sgd_step(ref, [(x, y)])
    # fp16 has 11 significant bits: the update agrees with fp32 to ~1e-3
    _assert_close_state(_state(engine.module), _state(ref), atol=2e-3)
    assert math.isclose(engine.get_global_grad_norm(), norm, rel_tol=1e-2)


def test_fp16_static_loss_scale():
    engine = _engine(fp16={"enabled": True, "loss_scale": 64})
    assert engine.get_loss_scale() == 64.0
    for x, y in _batches(2):
        engine.backward(engine(x, y))
        engine.step()
    assert engine.get_loss_scale() == 64.0 and engine.skipped_steps == 0


class DtypeProbe(nn.Module):
    """Records the dtypes its forward receives."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.seen: list[torch.dtype] = []

    def forward(self, x: torch.Tensor, idx: torch.Tensor, extra: dict[str, torch.Tensor]) -> torch.Tensor:
        self.seen += [x.dtype, idx.dtype, extra["w"].dtype]
        return self.lin(x.to(self.lin.weight.dtype)).float().sum()


@pytest.mark.parametrize("auto_cast", [True, False])
def test_fp16_auto_cast_casts_floating_inputs(auto_cast):
    probe = DtypeProbe()
    engine = _engine(model=probe, fp16={"enabled": True, "auto_cast": auto_cast})
    engine(torch.randn(2, 4), torch.arange(2), extra={"w": torch.ones(2)})
    want = torch.float16 if auto_cast else torch.float32
    assert probe.seen == [want, torch.int64, want]


# ---------------------------------------------------------------------------------------------------- bf16
def test_bf16_params_masters_and_optimizer():
    engine = _engine(bf16={"enabled": True})
    assert engine.bfloat16_enabled()
    params = list(engine.module.parameters())
    assert all(p.dtype == torch.bfloat16 for p in params)
    stepped = [q for g in engine.optimizer.param_groups for q in g["params"]]
    assert len(stepped) == N_TENSORS
    assert all(q.dtype == torch.float32 for q in stepped)
    assert not any(q is p for q in stepped for p in params)  # the optimizer steps fp32 masters
    for x, y in _batches(3):
        engine.backward(engine(x, y))
        engine.step()
    assert engine.global_steps == 3
    for p, m in zip(params, stepped):
        assert torch.equal(p, m.to(torch.bfloat16))  # module = masters cast down after each step


def test_bf16_masters_accumulate_below_bf16_resolution():
    # updates far below bf16's resolution are lost in bf16 but kept by the fp32 masters
    engine = _engine(bf16={"enabled": True}, optimizer={"type": "SGD", "params": {"lr": 1e-5}})
    start = [q.detach().clone() for g in engine.optimizer.param_groups for q in g["params"]]
    for x, y in _batches(2):
        engine.backward(engine(x, y))
        engine.step()
    now = [q for g in engine.optimizer.param_groups for q in g["params"]]
    assert any(not torch.equal(a, b) for a, b in zip(start, now))


def test_bf16_check_grad_overflow_skips_step():
    engine = _engine(bf16={"enabled": True, "check_grad_overflow": True})
    before = _state(engine.module)
    handle = engine.module.fc2.weight.register_hook(_inf_hook)
    engine.backward(engine(*_batches(1)[0]))
    engine.step()
    handle.remove()
    assert not engine.was_step_applied() and engine.skipped_steps == 1
    _assert_close_state(_state(engine.module), before, atol=0)
    engine.backward(engine(*_batches(1)[0]))
    engine.step()
    assert engine.was_step_applied()
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())


# ---------------------------------------------------------------------------------------------------- memory
def _one_step(engine) -> None:
    for batch in _batches(engine.gradient_accumulation_steps()):
        engine.backward(engine(*batch))
        engine.step()


ADAMW = {"type": "AdamW", "params": {"lr": 1e-3}}


@pytest.mark.parametrize(
    "precision,expected",
    [
        # (parameters, gradients, master weights, optimizer states): Adam keeps two fp32 moments (8Ψ) and
        # one fp32 scalar step counter per parameter tensor.
        ({}, (4 * PSI, 4 * PSI, 0, 8 * PSI + 4 * N_TENSORS)),
        # bf16 without accumulation keeps bf16 gradients (the same numbers as DeepSpeed's fp32 copies)
        ({"bf16": {"enabled": True}}, (2 * PSI, 2 * PSI, 4 * PSI, 8 * PSI + 4 * N_TENSORS)),
        # with gradient accumulation they are accumulated in fp32 (more accurate than DeepSpeed's bf16)
        (
            {"bf16": {"enabled": True}, "gradient_accumulation_steps": 2},
            (2 * PSI, 4 * PSI, 4 * PSI, 8 * PSI + 4 * N_TENSORS),
        ),
        (
            {"fp16": {"enabled": True, "initial_scale_power": 8}},
            (2 * PSI, 2 * PSI, 4 * PSI, 8 * PSI + 4 * N_TENSORS),
        ),
    ],
    ids=["fp32", "bf16", "bf16-gas2", "fp16"],
)
def test_memory_breakdown(precision, expected):
    engine = _engine(optimizer=ADAMW, **precision)
    _one_step(engine)
    assert engine.was_step_applied()
    mem = engine.memory_breakdown()
    assert (mem.parameters, mem.gradients, mem.master_weights, mem.optimizer_states) == expected
    assert mem.total == sum(expected)


def test_memory_breakdown_counts_tied_weights_once():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.net(idx).float().pow(2).mean()

    engine = _engine(model=Wrapper(), optimizer=ADAMW)
    engine.backward(engine(torch.arange(4)))
    engine.step()
    mem = engine.memory_breakdown()
    assert (mem.parameters, mem.gradients, mem.optimizer_states) == (160, 160, 8 * 40 + 4)


# ---------------------------------------------------------------------------------------------------- client objects
def test_client_optimizer_object():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    cfg = _config()
    del cfg["optimizer"]
    engine, optimizer, _, _ = deepshard.initialize(model=model, optimizer=opt, config=cfg)
    assert optimizer is opt and engine.optimizer is opt
    before = _state(model)
    _one_step(engine)
    assert engine.was_step_applied()
    assert any(not torch.equal(v, before[k]) for k, v in _state(model).items())


def test_client_optimizer_object_with_bf16_steps_masters():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    cfg = _config(bf16={"enabled": True})
    del cfg["optimizer"]
    engine, optimizer, _, _ = deepshard.initialize(model=model, optimizer=opt, config=cfg)
    assert optimizer is opt
    assert all(q.dtype == torch.float32 for g in opt.param_groups for q in g["params"])
    _one_step(engine)
    assert engine.was_step_applied()


def test_client_optimizer_callable_gets_model_parameters():
    received = []

    def make(params):
        params = list(params)
        received.extend(params)
        return torch.optim.SGD(params, lr=0.5)

    model = _model()
    cfg = _config()
    del cfg["optimizer"]
    engine, optimizer, _, _ = deepshard.initialize(model=model, optimizer=make, config=cfg)
    assert isinstance(optimizer, torch.optim.SGD) and engine.get_lr() == [0.5]
    assert [id(p) for p in received] == [id(p) for p in model.parameters()]


def test_client_scheduler_object():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    cfg = _config()
    del cfg["optimizer"]
    engine, _, _, scheduler = deepshard.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
    assert scheduler is sched and engine.lr_scheduler is sched
    _one_step(engine)
    assert engine.get_lr() == [pytest.approx(LR / 2)]


def test_client_scheduler_callable_receives_the_optimizer():
    got = []

    def make(optimizer):
        got.append(optimizer)
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)

    engine, optimizer, _, scheduler = deepshard.initialize(
        model=_model(), lr_scheduler=make, config=_config()
    )
    assert got == [optimizer] and scheduler is engine.lr_scheduler
    _one_step(engine)
    _one_step(engine)
    assert engine.get_lr() == [pytest.approx(LR / 100)]


def test_client_scheduler_class_is_called_with_the_optimizer():
    # DeepSpeed calls any callable lr_scheduler with the optimizer; a scheduler class is such a callable.
    engine, _, _, scheduler = deepshard.initialize(
        model=_model(), lr_scheduler=torch.optim.lr_scheduler.ConstantLR, config=_config()
    )
    assert isinstance(scheduler, torch.optim.lr_scheduler.ConstantLR)
    _one_step(engine)


def test_client_scheduler_wins_over_the_config_section(caplog):
    # DeepSpeed's rule (issue #14): the client's scheduler is used, one warning names the ignored section
    sched = {"type": "WarmupLR", "params": {"warmup_num_steps": 2}}
    with caplog.at_level(logging.WARNING, logger="deepshard"):
        _, _, _, scheduler = deepshard.initialize(
            model=_model(), lr_scheduler=torch.optim.lr_scheduler.ConstantLR, config=_config(scheduler=sched)
        )
    assert isinstance(scheduler, torch.optim.lr_scheduler.ConstantLR)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'scheduler' section ('WarmupLR') is ignored" in warnings[0]


def test_client_optimizer_wins_over_the_config_section(caplog):
    model = _model()
    client = torch.optim.SGD(model.parameters(), lr=0.5)
    with caplog.at_level(logging.WARNING, logger="deepshard"):
        engine, optimizer, _, _ = deepshard.initialize(model=model, optimizer=client, config=_config())
    assert optimizer is client and engine.get_lr() == [0.5]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'optimizer' section ('SGD') is ignored" in warnings[0]


def test_config_scheduler_without_optimizer_is_an_error():
    cfg = _config(scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 2}})
    del cfg["optimizer"]
    with pytest.raises(ValueError, match="'scheduler' section but no optimizer; add an 'optimizer' section"):
        deepshard.initialize(model=_model(), config=cfg)


def test_config_scheduler_is_stepped_each_boundary():
    sched = {
        "type": "WarmupLR",
        "params": {
            "warmup_min_lr": 0.0,
            "warmup_max_lr": 0.1,
            "warmup_num_steps": 4,
            "warmup_type": "linear",
        },
    }
    engine = _engine(gas=2, scheduler=sched)
    lrs = [engine.get_lr()[0]]
    for x, y in _batches(8):
        engine.backward(engine(x, y))
        engine.step()
        if engine.was_step_applied():
            lrs.append(engine.get_lr()[0])
    # DeepSpeed's WarmupLR: min lr at construction; step k (from 0) sets min + (max - min) * k / num_steps
    assert lrs == pytest.approx([0.0, 0.0, 0.025, 0.05, 0.075])


# ---------------------------------------------------------------------------------------------------- bad input
def test_initialize_without_model():
    with pytest.raises(ValueError, match=r"initialize\(\) needs model=<torch.nn.Module>"):
        deepshard.initialize(config=_config())


def test_initialize_with_non_module():
    with pytest.raises(ValueError, match="model must be a torch.nn.Module, got function"):
        deepshard.initialize(model=lambda x: x, config=_config())


def test_non_scalar_loss():
    engine = _engine()
    with pytest.raises(ValueError) as info:
        engine.backward(torch.ones(2, requires_grad=True))
    message = str(info.value)
    assert "scalar loss" in message and "(2,)" in message and "loss.mean()" in message
    with pytest.raises(ValueError, match="got float"):
        engine.backward(1.0)  # type: ignore[arg-type]


def test_step_without_optimizer():
    cfg = _config()
    del cfg["optimizer"]
    engine, optimizer, _, _ = deepshard.initialize(model=_model(), config=cfg)
    assert optimizer is None and engine.get_lr() == []
    engine.backward(engine(*_batches(1)[0]))
    with pytest.raises(ValueError, match=r"step\(\) needs an optimizer: pass optimizer= to initialize\(\)"):
        engine.step()


def test_no_config():
    with pytest.raises(ConfigError, match="no config: pass config="):
        deepshard.initialize(model=_model())


# ---------------------------------------------------------------------------------------------------- config sources
def _args(path: str | None, *extra: str) -> argparse.Namespace:
    parser = deepshard.add_config_arguments(argparse.ArgumentParser())
    argv = ["--deepspeed", *extra] + (["--deepspeed_config", path] if path else [])
    return parser.parse_args(argv)


def test_add_config_arguments():
    args = _args(None)
    assert args.deepspeed is True and args.deepspeed_config is None
    assert args.deepscale is False and args.deepscale_config is None


def test_args_with_deepspeed_config_path(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(_config(gas=4)))
    engine, *_ = deepshard.initialize(args=_args(str(path)), model=_model())
    assert engine.gradient_accumulation_steps() == 4 and engine.train_batch_size() == 8


def test_legacy_deepscale_config(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_config(gas=2)))
    args = deepshard.add_config_arguments(argparse.ArgumentParser()).parse_args(
        ["--deepscale_config", str(path)]
    )
    engine, *_ = deepshard.initialize(args=args, model=_model())
    assert engine.gradient_accumulation_steps() == 2


def test_config_given_twice(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(_config()))
    with pytest.raises(ConfigError) as info:
        deepshard.initialize(args=_args(str(path)), model=_model(), config=_config())
    message = str(info.value)
    assert "given twice" in message and str(path) in message and "pass only one" in message


def test_config_params_alias():
    engine, *_ = deepshard.initialize(model=_model(), config_params=_config(gas=5))
    assert engine.gradient_accumulation_steps() == 5


# ---------------------------------------------------------------------------------------------------- data
def _dataset(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n).float().unsqueeze(1).repeat(1, 4), torch.zeros(n, 2))


def test_training_data_builds_a_loader():
    engine, _, loader, _ = deepshard.initialize(model=_model(), training_data=_dataset(10), config=_config())
    assert loader is engine.training_dataloader
    assert len(loader) == 5
    seen = []
    for x, y in loader:
        assert x.shape == (2, 4) and y.shape == (2, 2)
        seen += x[:, 0].long().tolist()
    assert sorted(seen) == list(range(10))


def test_deepspeed_io_batch_size_and_collate():
    engine = _engine()
    loader = engine.deepspeed_io(_dataset(10), batch_size=4)
    assert len(loader) == 3
    assert [len(b[0]) for b in loader] == [4, 4, 2]
    calls = []

    def collate(items):
        calls.append(len(items))
        return len(items)

    loader = engine.deepspeed_io(_dataset(5), collate_fn=collate)
    assert list(loader) == [2, 2, 1] and calls == [2, 2, 1]


def test_dataloader_drop_last():
    engine = _engine(dataloader_drop_last=True)
    assert len(engine.deepspeed_io(_dataset(5))) == 2


def test_bf16_skips_an_overflowing_step_by_default():
    # DeepSpeed 0.19.8's bf16.check_grad_overflow default is true (issue #14): an inf gradient skips the step
    engine = _engine(bf16={"enabled": True})
    before = [p.detach().clone() for p in engine.module.parameters()]
    x = torch.full((2, 4), float("inf"))
    loss = engine(x, torch.zeros(2, 2))
    engine.backward(loss)
    engine.step()
    assert not engine.was_step_applied() and engine.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))


@pytest.mark.parametrize("load_optimizer_states", [True, False])
def test_load_without_optimizer_states_uses_the_restored_schedule_lr(tmp_path, load_optimizer_states):
    # issue #14: DeepSpeed leaves the fresh optimizer's lr (0 at the start of a warmup from 0) for the next step
    sched = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_num_steps": 10}}
    engine = _engine(scheduler=sched)
    for _ in range(3):
        _one_step(engine)
    engine.save_checkpoint(str(tmp_path))
    fresh = _engine(scheduler=sched)
    assert fresh.get_lr() == [0.0]
    fresh.load_checkpoint(str(tmp_path), load_optimizer_states=load_optimizer_states)
    assert fresh.get_lr() == engine.get_lr() and engine.get_lr()[0] > 0
