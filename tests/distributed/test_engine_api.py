"""Engine API semantics on two gloo ranks, each checked against a single-process PyTorch reference.

Rank functions are module-level (the harness pickles them) and return plain tensors and numbers; the
references run in the test process on the same seeds and data.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import deepshard

LR = 0.1
MICRO = 2


class Branchy(nn.Module):
    """``forward(x, y, use_extra)``: ``extra`` only takes part when ``use_extra`` (rank-dependent flow)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.extra = nn.Linear(8, 8)
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, y: torch.Tensor, use_extra: bool = True) -> torch.Tensor:
        h = torch.tanh(self.inp(x.to(self.inp.weight.dtype)))
        if use_extra:
            h = h + torch.tanh(self.extra(h))
        return F.mse_loss(self.out(h).float(), y)


class TiedLM(nn.Module):
    """Embedding and output projection share one weight (as GPT-2's LM head)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = self.head(torch.tanh(self.mix(self.emb(idx))))
        return F.cross_entropy(logits.float(), target)


def _branchy(seed: int = 0) -> Branchy:
    torch.manual_seed(seed)
    return Branchy()


def _tied(seed: int = 0) -> TiedLM:
    torch.manual_seed(seed)
    return TiedLM()


def _global_batches(n: int, world: int = 2, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(MICRO * world, 4, generator=gen), torch.randn(MICRO * world, 2, generator=gen))
        for _ in range(n)
    ]


def _token_batches(n: int, world: int = 2, seed: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 16, (MICRO * world,), generator=gen), torch.randint(0, 16, (MICRO * world,), generator=gen))
            for _ in range(n)]  # fmt: skip


def _mine(batch: tuple[torch.Tensor, torch.Tensor], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    return x[rank * MICRO : (rank + 1) * MICRO], y[rank * MICRO : (rank + 1) * MICRO]


def _config(gas: int = 1, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 0.0,
        "optimizer": {"type": "SGD", "params": {"lr": LR}},
    }
    cfg.update(extra)
    return cfg


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in module.state_dict().items()}


def _assert_close_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def _sgd(model: nn.Module, scale: float = 1.0) -> float:
    """Apply SGD to ``model`` with its ``.grad`` times ``scale``; return the norm of the scaled gradients."""
    grads = [p.grad * scale if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    with torch.no_grad():
        for p, g in zip(model.parameters(), grads):
            p -= LR * g
            p.grad = None
    return norm


# ---------------------------------------------------------------------------------------------------- rank functions
def _ga_with_boundary_override(steps: int, gas: int) -> dict[str, Any]:
    rank = deepshard.comm.get_rank()
    model = _branchy()
    engine, *_ = deepshard.initialize(model=model, config=_config(gas))
    batches = _global_batches(steps * gas)
    norms = []
    for s in range(steps):
        for i in range(gas):
            engine.set_gradient_accumulation_boundary(i == gas - 1)
            engine.backward(engine(*_mine(batches[s * gas + i], rank)))
        engine.step()  # one step() per optimizer step, as in DeepSpeed's docstring example
        assert engine.was_step_applied()
        norms.append(engine.get_global_grad_norm())
    return {"state": _state(engine.module), "norms": norms, "steps": engine.global_steps}


def _unused_on_one_rank(steps: int) -> dict[str, Any]:
    rank = deepshard.comm.get_rank()
    model = _branchy()
    engine, *_ = deepshard.initialize(
        model=model, config=_config(zero_optimization={"stage": 0, "reduce_bucket_size": 40})
    )
    batches = _global_batches(steps)
    for s in range(steps):
        engine.backward(engine(*_mine(batches[s], rank), use_extra=(rank == 0)))
        engine.step()
    return {"state": _state(engine.module), "norm": engine.get_global_grad_norm()}


def _tied_weights(steps: int) -> dict[str, Any]:
    rank = deepshard.comm.get_rank()
    model = _tied()
    cfg = _config(optimizer={"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}})
    engine, *_ = deepshard.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    assert engine.module.head.weight is engine.module.emb.weight
    batches = _token_batches(steps)
    for s in range(steps):
        engine.backward(engine(*_mine(batches[s], rank)))
        engine.step()
    assert engine.module.head.weight is engine.module.emb.weight
    return {"state": _state(engine.module), "mem": engine.memory_breakdown()}


def _param_groups(steps: int) -> dict[str, Any]:
    rank = deepshard.comm.get_rank()
    model = _branchy()
    groups = [
        {
            "params": list(model.inp.parameters()) + list(model.extra.parameters()),
            "lr": 0.05,
            "weight_decay": 0.0,
        },
        {"params": list(model.out.parameters()), "lr": 0.002, "weight_decay": 0.5},
    ]
    cfg = _config(optimizer={"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.01}})
    engine, optimizer, *_ = deepshard.initialize(model=model, model_parameters=groups, config=cfg)
    lrs = engine.get_lr()
    decays = [g["weight_decay"] for g in optimizer.param_groups]
    batches = _global_batches(steps)
    norms = []
    for s in range(steps):
        engine.backward(engine(*_mine(batches[s], rank)))
        engine.step()
        norms.append(engine.get_global_grad_norm())
    return {"state": _state(engine.module), "lrs": lrs, "decays": decays, "norms": norms}


def _fp16_overflow_on_rank0(steps: int) -> dict[str, Any]:
    rank = deepshard.comm.get_rank()
    model = _branchy()
    fp16 = {"enabled": True, "initial_scale_power": 8, "hysteresis": 1}
    engine, *_ = deepshard.initialize(model=model, config=_config(fp16=fp16))
    batches = _global_batches(steps)
    scales, applied = [], []
    for s in range(steps):
        handle = None
        if s == 1 and rank == 0:  # only rank 0 sees the overflow
            handle = engine.module.inp.weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        engine.backward(engine(*_mine(batches[s], rank)))
        if handle is not None:
            handle.remove()
        engine.step()
        scales.append(engine.get_loss_scale())
        applied.append(engine.was_step_applied())
    return {
        "state": _state(engine.module),
        "scales": scales,
        "applied": applied,
        "skipped": engine.skipped_steps,
    }


def _broadcast_at_init() -> dict[str, Any]:
    model = _branchy(seed=100 + deepshard.comm.get_rank())  # different initial weights on each rank
    engine, *_ = deepshard.initialize(model=model, config=_config())
    return _state(engine.module)


def _loader_indices(n: int) -> dict[str, Any]:
    dataset = TensorDataset(torch.arange(n))
    engine, _, loader, _ = deepshard.initialize(model=_branchy(), training_data=dataset, config=_config())
    first = [int(i) for (batch,) in loader for i in batch]
    second = [int(i) for (batch,) in loader for i in batch]
    io = engine.deepspeed_io(dataset, batch_size=3)
    return {"len": len(loader), "first": first, "second": second, "io_len": len(io)}


# ---------------------------------------------------------------------------------------------------- tests
def test_ga_with_set_gradient_accumulation_boundary(dist2):
    steps, gas = 3, 2
    results = dist2.run(_ga_with_boundary_override, steps, gas)
    ref = _branchy()
    batches = _global_batches(steps * gas)
    norms = []
    for s in range(steps):
        for i in range(gas):
            (ref(*batches[s * gas + i]) / gas).backward()
        norms.append(_sgd(ref))
    for r in results:
        assert r["steps"] == steps
        _assert_close_state(r["state"], _state(ref))
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(r["norms"], norms))


def test_unused_parameter_on_one_rank(dist2):
    steps = 2
    results = dist2.run(_unused_on_one_rank, steps, timeout_s=60)
    ref = _branchy()
    batches = _global_batches(steps)
    norm = 0.0
    for s in range(steps):
        # each rank's loss is a mean over its own micro-batch; data parallelism averages the two ranks,
        # and rank 1 contributes a zero gradient for ``extra``
        x0, y0 = _mine(batches[s], 0)
        x1, y1 = _mine(batches[s], 1)
        ((ref(x0, y0, True) + ref(x1, y1, False)) / 2).backward()
        norm = _sgd(ref)
    for r in results:
        _assert_close_state(r["state"], _state(ref))
        assert math.isclose(r["norm"], norm, rel_tol=1e-5)
    assert results[0]["norm"] == results[1]["norm"]


def test_tied_weights(dist2):
    steps = 3
    results = dist2.run(_tied_weights, steps)
    ref = _tied()
    opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    for batch in _token_batches(steps):
        ref(*batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for r in results:
        _assert_close_state(r["state"], _state(ref), atol=1e-5)
    n = sum(p.numel() for p in ref.parameters())  # the shared weight once
    assert results[0]["mem"].parameters == 4 * n and results[0]["mem"].gradients == 4 * n


def test_parameter_groups_keep_their_hyperparameters(dist2):
    steps = 3
    results = dist2.run(_param_groups, steps)
    ref = _branchy()
    groups = [
        {
            "params": list(ref.inp.parameters()) + list(ref.extra.parameters()),
            "lr": 0.05,
            "weight_decay": 0.0,
        },
        {"params": list(ref.out.parameters()), "lr": 0.002, "weight_decay": 0.5},
    ]
    opt = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.01, foreach=False)
    norms = []
    for batch in _global_batches(steps):
        ref(*batch).backward()
        norms.append(float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()]))))
        opt.step()
        opt.zero_grad(set_to_none=True)
    for r in results:
        assert r["lrs"] == [0.05, 0.002] and r["decays"] == [0.0, 0.5]
        _assert_close_state(r["state"], _state(ref), atol=1e-5)
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(r["norms"], norms))
    assert results[0]["norms"] == results[1]["norms"]  # every rank reports the same global norm


def test_fp16_overflow_on_one_rank_is_skipped_on_all(dist2):
    steps = 4
    results = dist2.run(_fp16_overflow_on_rank0, steps)
    for r in results:
        assert r["applied"] == [True, False, True, True]
        assert r["skipped"] == 1
        assert r["scales"] == [256.0, 128.0, 128.0, 128.0]  # hysteresis 1: the overflow halves at once
    _assert_close_state(results[0]["state"], results[1]["state"], atol=0)
    # the three applied steps follow the fp32 reference up to fp16 rounding
    ref = _branchy()
    for s, batch in enumerate(_global_batches(steps)):
        ref(*batch).backward()
        if s == 1:
            for p in ref.parameters():
                p.grad = None
            continue
        _sgd(ref)
    _assert_close_state(results[0]["state"], _state(ref), atol=5e-3)


def test_module_is_broadcast_from_rank0_at_initialize(dist2):
    results = dist2.run(_broadcast_at_init)
    _assert_close_state(results[1], results[0], atol=0)
    _assert_close_state(results[0], _state(_branchy(seed=100)), atol=0)


def test_training_data_is_split_disjointly(dist2):
    n = 12
    results = dist2.run(_loader_indices, n)
    for r in results:
        assert r["len"] == n // 2 // MICRO
        assert r["io_len"] == 2  # ceil(6 / 3)
        assert len(r["first"]) == len(r["second"]) == n // 2
    for epoch in ("first", "second"):  # in every epoch the ranks' shares are disjoint and cover the data
        a, b = set(results[0][epoch]), set(results[1][epoch])
        assert not a & b and a | b == set(range(n))
    assert results[0]["first"] != results[0]["second"]  # reshuffled per epoch without set_epoch()


def test_reference_helpers_are_consistent():
    # the single-process reference used above: averaging two half-batches equals the full batch mean
    model = _branchy()
    batch = _global_batches(1)[0]
    full = copy.deepcopy(model)
    full(*batch).backward()
    ((model(*_mine(batch, 0)) + model(*_mine(batch, 1))) / 2).backward()
    for p, q in zip(model.parameters(), full.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
