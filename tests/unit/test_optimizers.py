"""Optimizers from config: DeepSpeed's Adam semantics, fused selection, Lamb/Lion against reference math."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from deepshard.config.errors import ConfigError, NotSupportedYetError
from deepshard.runtime.optimizers import Lamb, Lion, build_optimizer

STEPS = 5


def _params(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(4, 3, generator=g).to(dtype)),
        torch.nn.Parameter(torch.randn(5, generator=g).to(dtype)),
        torch.nn.Parameter(torch.zeros(3, dtype=dtype)),  # zero weights: LAMB trust ratio falls back to 1
        torch.nn.Parameter(
            (1e-4 * torch.randn(6, generator=g)).to(dtype)
        ),  # tiny weights: ratio clamps to min
    ]


def _grads(params: list[torch.nn.Parameter], steps: int = STEPS, seed: int = 1) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g).to(p.dtype) for p in params] for _ in range(steps)]


def _run(
    opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], grads: list[list[torch.Tensor]]
) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


# ---- Adam / AdamW: DeepSpeed semantics -----------------------------------------------------------


def test_adam_defaults_to_decoupled_decay_with_zero_weight_decay() -> None:
    opt = build_optimizer("Adam", {"lr": 1e-3}, _params())
    assert type(opt) is torch.optim.AdamW  # adam_w_mode defaults to True, as in DeepSpeed
    assert opt.defaults["weight_decay"] == 0.0  # FusedAdam's default, not torch AdamW's 0.01
    assert opt.defaults["fused"] is True


@pytest.mark.parametrize(
    ("name", "extra", "expected"),
    [
        ("Adam", {}, torch.optim.AdamW),
        ("Adam", {"adam_w_mode": True}, torch.optim.AdamW),
        ("Adam", {"adam_w_mode": False}, torch.optim.Adam),
        ("adamw", {}, torch.optim.AdamW),
        ("AdamW", {"adam_w_mode": False}, torch.optim.AdamW),  # the name AdamW forces decoupled decay
    ],
)
def test_adam_w_mode_matches_torch_reference(
    name: str, extra: dict[str, Any], expected: type[torch.optim.Optimizer]
) -> None:
    hp = {"lr": 0.01, "betas": [0.8, 0.99], "eps": 1e-6, "weight_decay": 0.1}
    params, ref_params = _params(), _params()
    opt = build_optimizer(name, {**hp, **extra}, params)
    assert type(opt) is expected
    ref = expected(ref_params, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1, foreach=False)
    grads = _grads(params)
    _run(opt, params, grads)
    _run(ref, ref_params, grads)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)


def test_adam_and_l2_adam_differ_with_weight_decay() -> None:
    a, b = _params(), _params()
    grads = _grads(a)
    _run(build_optimizer("Adam", {"lr": 0.01, "weight_decay": 0.5}, a), a, grads)
    _run(build_optimizer("Adam", {"lr": 0.01, "weight_decay": 0.5, "adam_w_mode": False}, b), b, grads)
    assert not torch.allclose(a[0], b[0])


def test_torch_adam_uses_torch_defaults() -> None:
    opt = build_optimizer("AdamW", {"torch_adam": True}, _params())
    assert type(opt) is torch.optim.AdamW and opt.defaults["weight_decay"] == 0.01


# ---- fused / foreach selection --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "Adagrad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_chosen_on_cpu(name: str, dtype: torch.dtype) -> None:
    params = _params(dtype)
    opt = build_optimizer(name, {"lr": 0.01}, params)
    assert all(g["fused"] is True for g in opt.param_groups)
    _run(opt, params, _grads(params, steps=2))
    assert all(torch.isfinite(p.float()).all() for p in params)


def test_explicit_foreach_or_fused_is_respected() -> None:
    opt = build_optimizer("AdamW", {"foreach": True}, _params())
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    opt = build_optimizer("SGD", {"lr": 0.1, "fused": False}, _params())
    assert opt.defaults["fused"] is False


def test_torch_optimizer_by_name_and_param_groups() -> None:
    params = _params()
    groups = ({"params": iter(params[:2]), "lr": 0.5}, {"params": params[2]})  # generators are fine
    opt = build_optimizer("rmsprop", {"lr": 0.01, "momentum": 0.9}, iter(groups))
    assert type(opt) is torch.optim.RMSprop
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.01]
    assert type(build_optimizer("NAdam", {}, _params())) is torch.optim.NAdam


# ---- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "params", "error", "message"),
    [
        ("AdamX", {}, ConfigError, r"optimizer.type 'AdamX' is not a known optimizer. Did you mean 'Adam"),
        (
            "Adam",
            {"beta": [0.9, 0.9]},
            ConfigError,
            r"optimizer.params.beta is not a parameter of Adam. Did you mean 'betas'\?",
        ),
        (
            "Lamb",
            {"max_coef": 1.0},
            ConfigError,
            r"optimizer.params.max_coef is not a parameter of Lamb. Did you mean 'max_coeff'",
        ),
        (
            "SGD",
            {"lr": 0.1, "adam_w_mode": True},
            ConfigError,
            r"optimizer.params.adam_w_mode is not a parameter of torch.optim.SGD",
        ),
        ("Adam", {"max_grad_norm": 1.0}, ConfigError, r"max_grad_norm is not supported.*'gradient_clipping'"),
        ("Adam", {"lr": "auto"}, ConfigError, r"optimizer.params.lr is 'auto'"),
        (
            "Adam",
            {"adam_w_mode": "yes"},
            ConfigError,
            r"optimizer.params.adam_w_mode must be true or false, got 'yes'",
        ),
        (
            "Adam",
            {"lr": -1.0},
            ConfigError,
            r"optimizer 'Adam' \(AdamW\) rejected optimizer.params .*Invalid learning rate",
        ),
        (
            "Lion",
            {"betas": [1.5, 0.9]},
            ConfigError,
            r"rejected optimizer.params .*betas must both lie in \[0, 1\)",
        ),
        ("OneBitAdam", {}, NotSupportedYetError, r"optimizer.type 'OneBitAdam' is a DeepSpeed optimizer"),
        ("Adam", {"bias_correction": False}, NotSupportedYetError, r"optimizer.params.bias_correction=false"),
        ("Lamb", {"amsgrad": True}, NotSupportedYetError, r"optimizer.params.amsgrad=true"),
    ],
)
def test_errors(name: str, params: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        build_optimizer(name, params, _params())


def test_deepspeed_fixed_keys_accepted_at_their_default() -> None:
    build_optimizer("Adam", {"bias_correction": True, "set_grad_none": True, "torch_adam": False}, _params())
    build_optimizer("Lion", {"set_grad_none": True}, _params())
    build_optimizer("Lamb", {"amsgrad": False}, _params())


# ---- Lamb and Lion against per-element reference math -------------------------------------------


def _ref_lamb(
    p: torch.Tensor,
    grads: list[torch.Tensor],
    lr: float,
    b1: float,
    b2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    eps_inside_sqrt: bool,
    max_coeff: float,
    min_coeff: float,
) -> torch.Tensor:
    p = p.detach().clone()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t) if bias_correction else m
        v_hat = v / (1 - b2**t) if bias_correction else v
        denom = torch.sqrt(v_hat + eps) if eps_inside_sqrt else torch.sqrt(v_hat) + eps
        u = m_hat / denom + weight_decay * p
        w_norm, u_norm = float(torch.sqrt((p * p).sum())), float(torch.sqrt((u * u).sum()))
        ratio = min(max(w_norm / u_norm, min_coeff), max_coeff) if w_norm > 0 and u_norm > 0 else 1.0
        p = p - lr * ratio * u
    return p


def _ref_lion(
    p: torch.Tensor, grads: list[torch.Tensor], lr: float, b1: float, b2: float, weight_decay: float
) -> torch.Tensor:
    p = p.detach().clone()
    m = torch.zeros_like(p)
    for g in grads:
        p = p * (1 - lr * weight_decay)
        p = p - lr * torch.sign(b1 * m + (1 - b1) * g)
        m = b2 * m + (1 - b2) * g
    return p


LAMB_GROUPS = [
    dict(
        lr=0.02,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.01,
        bias_correction=True,
        eps_inside_sqrt=False,
        max_coeff=10.0,
        min_coeff=0.01,
    ),
    dict(
        lr=0.1,
        betas=(0.8, 0.95),
        eps=1e-3,
        weight_decay=0.0,
        bias_correction=False,
        eps_inside_sqrt=True,
        max_coeff=0.3,
        min_coeff=0.2,
    ),  # tight clamp: large weights hit max_coeff
]


@pytest.mark.parametrize("foreach", [False, True])
def test_lamb_matches_reference(foreach: bool) -> None:
    params = _params() + _params(seed=5)
    n = len(params) // 2
    groups = [{"params": params[:n], **LAMB_GROUPS[0]}, {"params": params[n:], **LAMB_GROUPS[1]}]
    initial = [p.detach().clone() for p in params]
    grads = _grads(params)
    _run(Lamb(groups, foreach=foreach), params, grads)
    for i, (p, p0) in enumerate(zip(params, initial)):
        hp: dict[str, Any] = dict(LAMB_GROUPS[0 if i < n else 1])
        b1, b2 = hp.pop("betas")
        expected = _ref_lamb(p0, [g[i] for g in grads], b1=b1, b2=b2, **hp)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-6)


def test_lamb_from_config_uses_deepspeed_defaults() -> None:
    opt = build_optimizer("LAMB", {"lr": 0.01}, _params())
    assert isinstance(opt, Lamb)
    d = opt.defaults
    assert (d["betas"], d["eps"], d["weight_decay"], d["max_coeff"], d["min_coeff"]) == (
        (0.9, 0.999),
        1e-8,
        0.0,
        10.0,
        0.01,
    )
    assert d["bias_correction"] is True and d["eps_inside_sqrt"] is False


@pytest.mark.parametrize("foreach", [False, True])
def test_lion_matches_reference(foreach: bool) -> None:
    params = _params() + _params(seed=5)
    hps = [
        dict(lr=0.01, betas=(0.9, 0.99), weight_decay=0.1),
        dict(lr=0.003, betas=(0.5, 0.9), weight_decay=0.0),
    ]
    n = len(params) // 2
    groups = [{"params": params[:n], **hps[0]}, {"params": params[n:], **hps[1]}]
    initial = [p.detach().clone() for p in params]
    grads = _grads(params)
    _run(Lion(groups, foreach=foreach), params, grads)
    for i, (p, p0) in enumerate(zip(params, initial)):
        hp: dict[str, Any] = dict(hps[0 if i < n else 1])
        b1, b2 = hp.pop("betas")
        expected = _ref_lion(p0, [g[i] for g in grads], b1=b1, b2=b2, **hp)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-6)


def test_lion_from_config_uses_deepspeed_defaults() -> None:
    opt = build_optimizer("lion", {}, _params())
    assert isinstance(opt, Lion)
    assert (opt.defaults["lr"], opt.defaults["betas"], opt.defaults["weight_decay"]) == (
        1e-3,
        (0.9, 0.999),
        0.0,
    )


@pytest.mark.parametrize("name", ["Lamb", "Lion"])
def test_state_dict_round_trip(name: str) -> None:
    hp = {"lr": 0.01, "weight_decay": 0.01}
    params_a = _params()
    grads = _grads(params_a, steps=6)
    opt_a = build_optimizer(name, hp, params_a)
    _run(opt_a, params_a, grads[:3])
    saved_params, saved_state = (
        copy.deepcopy([p.detach() for p in params_a]),
        copy.deepcopy(opt_a.state_dict()),
    )
    _run(opt_a, params_a, grads[3:])

    params_b = [torch.nn.Parameter(p.clone()) for p in saved_params]
    opt_b = build_optimizer(name, hp, params_b)
    opt_b.load_state_dict(saved_state)
    _run(opt_b, params_b, grads[3:])
    for a, b in zip(params_a, params_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["Lamb", "Lion", "AdamW"])
def test_bf16_params_follow_fp32(name: str) -> None:
    p32, p16 = _params(), _params(torch.bfloat16)
    grads = _grads(p32)
    _run(build_optimizer(name, {"lr": 0.01}, p32), p32, grads)
    _run(build_optimizer(name, {"lr": 0.01}, p16), p16, [[g.bfloat16() for g in s] for s in grads])
    for a, b in zip(p32, p16):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a.detach(), rtol=0.05, atol=0.05)


def test_named_parameters_are_accepted() -> None:
    params = _params()
    opt = build_optimizer("AdamW", {}, [(f"w{i}", p) for i, p in enumerate(params)])
    assert opt.defaults["fused"] is True
    _run(opt, params, _grads(params, steps=1))
