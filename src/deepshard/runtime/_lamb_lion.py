"""LAMB and Lion, the two DeepSpeed optimizers that ``torch.optim`` lacks.

Each has two implementations of the same math, as ``torch.optim`` does: a multi-tensor one built on
``torch._foreach_*`` ops (few kernel launches for many parameters; the default for CUDA tensors) and a
per-tensor loop (the default on CPU, where foreach ops fall back to a per-tensor loop that materialises
more temporaries). ``foreach=True/False`` picks one explicitly. Optimizer state has the parameter's
dtype and device, like ``torch.optim.AdamW``; mixed precision keeps an fp32 master copy above this layer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import ParamsT


def _default_foreach(params: list[Tensor]) -> bool:
    """Multi-tensor kernels pay off on accelerators; on CPU the per-tensor loop is faster."""
    return all(p.device.type != "cpu" for p in params)


def _check_common(lr: float, betas: tuple[float, float], weight_decay: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
        raise ValueError(f"betas must both lie in [0, 1), got {tuple(betas)}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")


def _grads_of(group: dict[str, Any], name: str) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters of ``group`` that have a gradient, and those gradients."""
    params, grads = [], []
    for p in group["params"]:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise RuntimeError(f"{name} does not support sparse gradients")
        params.append(p)
        grads.append(p.grad)
    return params, grads


class Lamb(Optimizer):
    """LAMB (You et al., 2019) with the semantics of DeepSpeed's ``FusedLamb``.

    Per parameter tensor ``p`` with gradient ``g`` at step ``t``::

        m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g*g
        m_hat = m / (1 - b1**t);  v_hat = v / (1 - b2**t)        # only when bias_correction
        u = m_hat / (sqrt(v_hat) + eps) + weight_decay * p        # sqrt(v_hat + eps) if eps_inside_sqrt
        r = clamp(|p| / |u|, min_coeff, max_coeff), or 1 when |p| or |u| is 0
        p = p - lr * r * u

    The trust ratio ``r`` is per tensor, so the result depends on how parameters are split into tensors;
    ZeRO shards must therefore step whole tensors (or reduce the two norms across shards) to match.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_inside_sqrt: bool = False,
        weight_decay: float = 0.0,
        max_coeff: float = 10.0,
        min_coeff: float = 0.01,
        foreach: bool | None = None,
    ) -> None:
        _check_common(lr, betas, weight_decay)
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not 0.0 <= min_coeff <= max_coeff:
            raise ValueError(
                f"need 0 <= min_coeff <= max_coeff, got min_coeff={min_coeff}, max_coeff={max_coeff}"
            )
        defaults = dict(
            lr=lr,
            bias_correction=bias_correction,
            betas=tuple(betas),
            eps=eps,
            eps_inside_sqrt=eps_inside_sqrt,
            weight_decay=weight_decay,
            max_coeff=max_coeff,
            min_coeff=min_coeff,
            foreach=foreach,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one LAMB update to every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = _grads_of(group, "Lamb")
            if not params:
                continue
            exp_avgs, exp_avg_sqs, bc1, bc2 = [], [], [], []
            beta1, beta2 = group["betas"]
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                t = state["step"].item()
                bc1.append(1.0 - beta1**t if group["bias_correction"] else 1.0)
                bc2.append(1.0 - beta2**t if group["bias_correction"] else 1.0)
            foreach = group["foreach"] if group["foreach"] is not None else _default_foreach(params)
            update = _lamb_foreach if foreach else _lamb_per_tensor
            update(params, grads, exp_avgs, exp_avg_sqs, bc1, bc2, group)
        return loss


def _lamb_per_tensor(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    bc1: list[float],
    bc2: list[float],
    group: dict[str, Any],
) -> None:
    beta1, beta2 = group["betas"]
    eps, wd, lr = group["eps"], group["weight_decay"], group["lr"]
    for p, g, m, v, c1, c2 in zip(params, grads, exp_avgs, exp_avg_sqs, bc1, bc2):
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        v_hat = v / c2
        denom = v_hat.add_(eps).sqrt_() if group["eps_inside_sqrt"] else v_hat.sqrt_().add_(eps)
        u = (m / c1).div_(denom)
        if wd != 0.0:
            u.add_(p, alpha=wd)
        w_norm, u_norm = p.norm(), u.norm()
        ratio = (w_norm / u_norm).clamp(group["min_coeff"], group["max_coeff"])
        ratio = torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
        p.add_(u.mul_(ratio), alpha=-lr)


def _lamb_foreach(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    bc1: list[float],
    bc2: list[float],
    group: dict[str, Any],
) -> None:
    beta1, beta2 = group["betas"]
    eps, wd, lr = group["eps"], group["weight_decay"], group["lr"]
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denom = torch._foreach_div(exp_avg_sqs, bc2)
    if group["eps_inside_sqrt"]:
        torch._foreach_add_(denom, eps)
        torch._foreach_sqrt_(denom)
    else:
        torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avgs, bc1)
    torch._foreach_div_(update, denom)
    if wd != 0.0:
        torch._foreach_add_(update, params, alpha=wd)
    # One trust ratio per tensor: 0-dim tensors, so no host sync happens here.
    w_norms, u_norms = torch._foreach_norm(params), torch._foreach_norm(update)
    ratios = []
    for w, u in zip(w_norms, u_norms):
        r = (w / u).clamp(group["min_coeff"], group["max_coeff"])
        ratios.append(torch.where((w > 0) & (u > 0), r, torch.ones_like(r)).mul_(-lr))
    torch._foreach_mul_(update, ratios)
    torch._foreach_add_(params, update)


class Lion(Optimizer):
    """Lion (Chen et al., 2023) with the semantics of DeepSpeed's ``FusedLion``.

    Per element, with decoupled weight decay applied to the pre-update parameter::

        p = p * (1 - lr*weight_decay)
        p = p - lr * sign(b1*m + (1-b1)*g)
        m = b2*m + (1-b2)*g

    Defaults are DeepSpeed's (``lr=1e-3, betas=(0.9, 0.999)``), not the paper's suggested
    ``lr=1e-4, betas=(0.9, 0.99)``. ``sign(0) = 0`` here; DeepSpeed's CUDA kernel moves such elements by
    ``+lr``, a difference only for elements whose interpolated momentum is exactly zero.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        foreach: bool | None = None,
    ) -> None:
        _check_common(lr, betas, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Apply one Lion update to every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads = _grads_of(group, "Lion")
            if not params:
                continue
            exp_avgs = []
            for p in params:
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                exp_avgs.append(state["exp_avg"])
            foreach = group["foreach"] if group["foreach"] is not None else _default_foreach(params)
            update = _lion_foreach if foreach else _lion_per_tensor
            update(params, grads, exp_avgs, group)
        return loss


def _lion_per_tensor(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], group: dict[str, Any]
) -> None:
    beta1, beta2 = group["betas"]
    lr, wd = group["lr"], group["weight_decay"]
    for p, g, m in zip(params, grads, exp_avgs):
        if wd != 0.0:
            p.mul_(1.0 - lr * wd)
        p.add_((m * beta1).add_(g, alpha=1.0 - beta1).sign_(), alpha=-lr)
        m.mul_(beta2).add_(g, alpha=1.0 - beta2)


def _lion_foreach(
    params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], group: dict[str, Any]
) -> None:
    beta1, beta2 = group["betas"]
    lr, wd = group["lr"], group["weight_decay"]
    if wd != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * wd)
    direction = torch._foreach_mul(exp_avgs, beta1)
    torch._foreach_add_(direction, grads, alpha=1.0 - beta1)
    torch._foreach_sign_(direction)
    torch._foreach_add_(params, direction, alpha=-lr)
    torch._foreach_mul_(exp_avgs, beta2)
    torch._foreach_add_(exp_avgs, grads, alpha=1.0 - beta2)
