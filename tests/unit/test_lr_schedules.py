"""LR schedules against DeepSpeed's formulas, written out independently here (not via the implementation)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from deepshard.config.errors import ConfigError
from deepshard.runtime.lr_schedules import LRSchedulerLike, build_lr_scheduler

STEPS = 50


def _adam(lr: float = 0.1, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))]} for _ in range(groups)]
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999))


def _lrs(sched: LRSchedulerLike, opt: torch.optim.Optimizer, steps: int = STEPS) -> list[float]:
    """lr in the optimizer after each of ``steps`` step() calls (index i = iteration i)."""
    out = []
    for _ in range(steps):
        sched.step()
        out.append(float(opt.param_groups[0]["lr"]))
        assert sched.get_last_lr()[0] == pytest.approx(out[-1])
    return out


def _close(actual: list[float], expected: list[float]) -> None:
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a == pytest.approx(e, rel=1e-12, abs=1e-15), f"iteration {i}: {a} != {e}"


# ---- WarmupLR / WarmupDecayLR --------------------------------------------------------------------


@pytest.mark.parametrize("warmup_type", ["log", "linear"])
def test_warmup_lr(warmup_type: str) -> None:
    opt = _adam()
    sched = build_lr_scheduler(
        "WarmupLR",
        {"warmup_min_lr": 0.01, "warmup_max_lr": 0.1, "warmup_num_steps": 10, "warmup_type": warmup_type},
        opt,
    )
    assert opt.param_groups[0]["lr"] == 0.01  # written at construction
    expected = []
    for i in range(STEPS):
        if i < 10:
            frac = math.log(i + 1) / math.log(10) if warmup_type == "log" else i / 10
        else:
            frac = 1.0
        expected.append(0.01 + 0.09 * frac)
    got = _lrs(sched, opt)
    _close(got, expected)
    assert got[0] == 0.01 and got[10] == 0.1
    if warmup_type == "log":
        assert got[9] == pytest.approx(0.1)  # log warmup reaches the top at iteration W-1


def test_warmup_lr_defaults_to_optimizer_lr_and_min_two_steps() -> None:
    opt = _adam(lr=0.3)
    sched = build_lr_scheduler("warmuplr", {"warmup_num_steps": 1}, opt)  # W is raised to 2
    assert opt.param_groups[0]["lr"] == 0.0
    _close(_lrs(sched, opt, 3), [0.0, 0.3 * math.log(2) / math.log(2), 0.3])


def test_warmup_lr_per_group_values() -> None:
    opt = _adam(groups=2)
    sched = build_lr_scheduler(
        "WarmupLR",
        {
            "warmup_min_lr": [0.0, 0.1],
            "warmup_max_lr": [1.0, 0.2],
            "warmup_num_steps": 4,
            "warmup_type": "linear",
        },
        opt,
    )
    sched.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.25, 0.125])


@pytest.mark.parametrize("warmup_type", ["log", "linear"])
def test_warmup_decay_lr(warmup_type: str) -> None:
    opt = _adam()
    total, warm = 40, 10
    sched = build_lr_scheduler(
        "WarmupDecayLR",
        {
            "total_num_steps": total,
            "warmup_min_lr": 0.0,
            "warmup_max_lr": 0.05,
            "warmup_num_steps": warm,
            "warmup_type": warmup_type,
        },
        opt,
    )
    expected = []
    for i in range(STEPS):
        if i < warm:
            gamma = math.log(i + 1) / math.log(warm) if warmup_type == "log" else i / warm
        else:
            gamma = max(0.0, (total - i) / (total - warm))
        expected.append(0.05 * gamma)
    got = _lrs(sched, opt)
    _close(got, expected)
    assert got[warm] == pytest.approx(0.05) and got[total] == 0.0 and got[-1] == 0.0


def test_warmup_decay_default_max_lr() -> None:
    opt = _adam(lr=0.5)
    sched = build_lr_scheduler("WarmupDecayLR", {"total_num_steps": 10, "warmup_num_steps": 2}, opt)
    sched.step(5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.001 * 5 / 8)


# ---- WarmupCosineLR ------------------------------------------------------------------------------


@pytest.mark.parametrize("warmup_type", ["log", "linear"])
def test_warmup_cosine_lr(warmup_type: str) -> None:
    base, total, warm, r0, c = 0.1, 40, 10, 0.1, 0.05
    opt = _adam(lr=base)
    sched = build_lr_scheduler(
        "WarmupCosineLR",
        {
            "total_num_steps": total,
            "warmup_num_steps": warm,
            "warmup_min_ratio": r0,
            "cos_min_ratio": c,
            "warmup_type": warmup_type,
        },
        opt,
    )
    assert opt.param_groups[0]["lr"] == 0.0  # DeepSpeed writes ratio 0 before the first step
    expected = []
    for i in range(STEPS):
        if i < warm:
            frac = math.log(i + 1) / math.log(warm) if warmup_type == "log" else i / warm
            ratio = r0 + (1 - r0) * frac
        else:
            progress = min(1.0, (i - warm + 1) / (total - warm))
            ratio = c + (1 - c) * 0.5 * (1 + math.cos(math.pi * progress))
        expected.append(base * ratio)
    got = _lrs(sched, opt)
    _close(got, expected)
    assert got[0] == pytest.approx(base * r0)
    assert got[total - 1] == pytest.approx(base * c) and got[-1] == pytest.approx(base * c)


def test_warmup_cosine_defaults() -> None:
    opt = _adam(lr=1.0)
    sched = build_lr_scheduler("WarmupCosineLR", {"total_num_steps": 2000}, opt)
    sched.step(0)
    assert opt.param_groups[0]["lr"] == 0.0  # warmup_min_ratio 0
    sched.step(5000)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0001)  # cos_min_ratio 1e-4


# ---- OneCycle ------------------------------------------------------------------------------------

ONE_CYCLE = {
    "cycle_min_lr": 0.01,
    "cycle_max_lr": 0.1,
    "cycle_first_step_size": 10,
    "cycle_second_step_size": 15,
    "decay_step_size": 5,
    "decay_lr_rate": 0.5,
    "cycle_min_mom": 0.85,
    "cycle_max_mom": 0.95,
    "decay_mom_rate": 0.01,
}


def _one_cycle_scale(b: int, up_stairs: int = 0, down_stairs: int = 0) -> float:
    """Position in the 25-iteration cycle, b = iteration + 1 in 1..25."""
    if b <= 10:
        return math.floor(b * up_stairs / 10) / up_stairs if up_stairs else b / 10
    return math.floor((25 - b) * down_stairs / 15) / down_stairs if down_stairs else (25 - b) / 15


def test_one_cycle_lr_and_betas() -> None:
    opt = _adam()
    sched = build_lr_scheduler("OneCycle", ONE_CYCLE, opt)
    assert opt.param_groups[0]["lr"] == 0.01
    assert opt.param_groups[0]["betas"] == (0.85, 0.999)  # min momentum at construction, beta2 kept
    lrs, moms = [], []
    for _ in range(STEPS):
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        moms.append(opt.param_groups[0]["betas"][0])
        assert opt.param_groups[0]["betas"][1] == 0.999
    exp_lr, exp_mom = [], []
    for i in range(STEPS):
        if i < 25:
            s = _one_cycle_scale(i + 1)
            exp_lr.append(0.01 + 0.09 * s)
            exp_mom.append(0.95 - 0.1 * s)
        else:
            exp_lr.append(0.01 / (1 + 0.5 * (i - 24) / 5))
            exp_mom.append(0.95 * (1 + 0.01 * (i - 24) / 5))
    _close(lrs, exp_lr)
    _close(moms, exp_mom)
    assert lrs[9] == pytest.approx(0.1) and moms[9] == pytest.approx(0.85)  # peak at the first half's end
    assert lrs[24] == pytest.approx(0.01)  # back to the minimum at the cycle's end


def test_one_cycle_stairs_and_sgd_momentum() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.5, momentum=0.5)
    params: dict[str, Any] = dict(ONE_CYCLE, cycle_first_stair_count=5, cycle_second_stair_count=3)
    sched = build_lr_scheduler("OneCycle", params, opt)
    assert opt.param_groups[0]["momentum"] == 0.85
    for i in range(25):
        sched.step()
        s = _one_cycle_scale(i + 1, 5, 3)
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01 + 0.09 * s)
        assert opt.param_groups[0]["momentum"] == pytest.approx(0.95 - 0.1 * s)


def test_one_cycle_defaults_no_decay_and_no_momentum_key() -> None:
    opt = torch.optim.Adagrad([torch.nn.Parameter(torch.zeros(2))], lr=0.5)  # no betas, no momentum
    sched = build_lr_scheduler("OneCycle", {"cycle_min_lr": 0.1, "cycle_max_lr": 1.0}, opt)
    assert sched.cycle_momentum is False  # type: ignore[attr-defined]
    sched.step(1999)  # second step size defaults to the first (2000): mid-way down
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)
    sched.step(4100)  # decay_step_size 0: no decay after the cycle
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


# ---- LRRangeTest ---------------------------------------------------------------------------------


@pytest.mark.parametrize("staircase", [False, True])
def test_lr_range_test(staircase: bool) -> None:
    opt = _adam()
    sched = build_lr_scheduler(
        "LRRangeTest",
        {
            "lr_range_test_min_lr": 0.001,
            "lr_range_test_step_size": 5,
            "lr_range_test_step_rate": 2.0,
            "lr_range_test_staircase": staircase,
        },
        opt,
    )
    assert opt.param_groups[0]["lr"] == 0.001
    expected = []
    for i in range(STEPS):
        k = (i + 1) // 5 if staircase else (i + 1) / 5
        expected.append(0.001 * (1 + 2.0 * k))
    _close(_lrs(sched, opt), expected)


# ---- state, resume, torch schedules, tensor lr ---------------------------------------------------

ROUND_TRIP = [
    ("WarmupLR", {"warmup_max_lr": 0.1, "warmup_num_steps": 10}),
    ("WarmupDecayLR", {"total_num_steps": 30, "warmup_num_steps": 10}),
    ("WarmupCosineLR", {"total_num_steps": 30, "warmup_num_steps": 10}),
    ("OneCycle", ONE_CYCLE),
    ("LRRangeTest", {"lr_range_test_step_size": 3}),
]


@pytest.mark.parametrize(("name", "params"), ROUND_TRIP)
def test_state_dict_round_trip(name: str, params: dict[str, Any]) -> None:
    opt_a = _adam()
    a = build_lr_scheduler(name, params, opt_a)
    _lrs(a, opt_a, 17)
    state = a.state_dict()
    assert state == {"last_batch_iteration": 16}
    opt_b = _adam()
    b = build_lr_scheduler(name, params, opt_b)
    b.load_state_dict(state)
    _close(_lrs(b, opt_b, 10), _lrs(a, opt_a, 10))
    if name == "OneCycle":
        assert opt_b.param_groups[0]["betas"] == opt_a.param_groups[0]["betas"]


def test_resume_does_not_write_lr_until_step() -> None:
    opt = _adam(lr=0.7)
    sched = build_lr_scheduler("WarmupLR", {"warmup_num_steps": 10, "last_batch_iteration": 4}, opt)
    assert opt.param_groups[0]["lr"] == 0.7
    with pytest.raises(RuntimeError, match="step"):
        sched.get_last_lr()
    sched.step()
    assert sched.last_batch_iteration == 5  # type: ignore[attr-defined]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.7 * math.log(6) / math.log(10))


def test_tensor_lr_stays_a_tensor() -> None:
    lr = torch.tensor(0.1)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=lr)
    sched = build_lr_scheduler("WarmupLR", {"warmup_num_steps": 10, "warmup_type": "linear"}, opt)
    sched.step(5)
    assert opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.05)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_torch_scheduler_by_name() -> None:
    opt = _adam(lr=1.0)
    sched = build_lr_scheduler("steplr", {"step_size": 2, "gamma": 0.5}, opt)
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR)
    assert isinstance(sched, LRSchedulerLike)
    _close(_lrs(sched, opt, 4), [1.0, 0.5, 0.5, 0.25])


# ---- errors --------------------------------------------------------------------------------------


def test_unknown_type_suggests() -> None:
    with pytest.raises(ConfigError, match=r"scheduler.type 'WarmupCosine'.*Did you mean 'WarmupCosineLR'\?"):
        build_lr_scheduler("WarmupCosine", {"total_num_steps": 10}, _adam())
    with pytest.raises(ConfigError, match=r"not a known LR schedule.*Choose one of: .*OneCycle"):
        build_lr_scheduler("LambdaLR", {}, _adam())  # needs a Python callable, not expressible in JSON


def test_unknown_param_suggests() -> None:
    with pytest.raises(
        ConfigError,
        match=r"scheduler.params.warmup_num_step is not a parameter of WarmupLR. Did you mean 'warmup_num_steps'",
    ):
        build_lr_scheduler("WarmupLR", {"warmup_num_step": 10}, _adam())


def test_missing_required_param() -> None:
    with pytest.raises(ConfigError, match=r"scheduler.params.total_num_steps is required by WarmupDecayLR"):
        build_lr_scheduler("WarmupDecayLR", {"warmup_num_steps": 10}, _adam())
    with pytest.raises(ConfigError, match=r"scheduler.params.cycle_min_lr is required by OneCycle"):
        build_lr_scheduler("OneCycle", {"cycle_max_lr": 0.1}, _adam())


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("WarmupLR", {"warmup_type": "lin"}, r"warmup_type is 'lin'. Did you mean 'linear'\?"),
        ("WarmupLR", {"warmup_num_steps": 0}, r"warmup_num_steps must be an integer >= 1, got 0"),
        ("WarmupLR", {"warmup_max_lr": "auto"}, r"warmup_max_lr is 'auto'"),
        ("WarmupLR", {"warmup_min_lr": [0.1, 0.2]}, r"warmup_min_lr has 2 values but the optimizer has 1"),
        ("WarmupCosineLR", {"total_num_steps": 1.5}, r"total_num_steps must be an integer"),
        ("OneCycle", {"cycle_min_lr": "x", "cycle_max_lr": 1.0}, r"cycle_min_lr must be a number, got 'x'"),
        ("LRRangeTest", {"lr_range_test_staircase": "yes"}, r"lr_range_test_staircase must be true or false"),
        ("OneCycleLR", {"max_lr": 0.1}, r"scheduler 'OneCycleLR' rejected scheduler.params .*total_steps"),
    ],
)
def test_bad_values(name: str, params: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_lr_scheduler(name, params, _adam())
