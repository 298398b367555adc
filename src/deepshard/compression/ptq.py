"""Post-training quantization (ZeroQuant-style): group-wise weights, token-wise dynamic activations, GPTQ, SmoothQuant.

:func:`quantize_model` replaces the selected ``nn.Linear`` layers of a trained model by
:class:`PTQLinear`, which stores integer weights on the grid of the inference engine's
:class:`~deepshard.inference.quant.QuantizedLinear` (per row, ``group_size`` consecutive inputs per scale)
and optionally quantizes its input on the fly:

- ``act_granularity="token"``: one symmetric scale per token (ZeroQuant), computed at run time;
- ``"tensor"``: one dynamic scale for the whole input (the per-tensor baseline).

Two calibration-based refinements use a few batches of inputs (:func:`calibrate`):

- **GPTQ** (error-compensated rounding): columns are rounded one at a time and the rounding error of each
  is spread over the not yet rounded columns through the inverse of the input Hessian ``H = X^T X``
  (damped by 1 % of its mean diagonal), minimising ``||X W^T - X Q^T||``. Costs one ``[in, in]`` matrix per
  layer and a Cholesky factorisation. The Hessians are collected from the float model in one pass (not
  layer by layer from the partly quantized model, as the original GPTQ does).
- **SmoothQuant**: per input channel ``s_j = max|X_j|**alpha / max|W_:,j|**(1 - alpha)``; the layer computes
  ``(x / s) (W * s)^T``, moving activation outliers into the weights so that per-tensor activation scales
  lose less. The division by ``s`` is stored in the layer (a real deployment folds it into the
  preceding normalisation's weight).

:func:`export_packed` turns every :class:`PTQLinear` into the inference engine's ``QuantizedLinear``
(int8, or int4 two per byte) with the same integers and scales, which ``init_inference`` runs as is;
the exported layers are weight-only (activations stay in floating point).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from deepshard.compression.patterns import select
from deepshard.compression.quantizers import quantize_symmetric
from deepshard.inference.quant import QuantizedLinear, pack_int4, quantize

logger = logging.getLogger(__name__)

ActGranularity = Literal["token", "tensor"]


@dataclass
class LayerStats:
    """Calibration statistics of one linear layer's input: per-channel ``max|x|`` and, optionally, ``X^T X``."""

    absmax: torch.Tensor
    hessian: torch.Tensor | None = None
    rows: int = 0


@dataclass
class PTQRecipe:
    """What :func:`quantize_model` does. ``weight_group_size=None`` is one scale per whole weight tensor."""

    weight_bits: int = 8
    weight_group_size: int | None = 64
    symmetric: bool = True
    act_bits: int | None = 8
    act_granularity: ActGranularity = "token"
    smooth_alpha: float | None = None
    gptq: bool = False
    gptq_damp: float = 0.01
    modules: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)


class PTQLinear(nn.Module):
    """A linear layer with integer weights ``q`` (+ ``scale``, ``zero`` per row group) and quantized inputs.

    ``weight()`` is the dequantized weight the forward uses; ``smooth`` (``[in]`` or ``None``) divides the
    input first. Per-tensor weights (``group_size is None``) keep only the dequantized weight.
    """

    q: torch.Tensor | None
    w_dq: torch.Tensor
    scale: torch.Tensor | None
    zero: torch.Tensor | None
    smooth: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        recipe: PTQRecipe,
        codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None,
        dequantized: torch.Tensor,
        smooth: torch.Tensor | None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bits, self.group_size, self.symmetric = (
            recipe.weight_bits,
            recipe.weight_group_size,
            recipe.symmetric,
        )
        self.act_bits, self.act_granularity = recipe.act_bits, recipe.act_granularity
        q, scale, zero = codes if codes is not None else (None, None, None)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("w_dq", dequantized.to(weight.dtype))
        self.register_buffer("smooth", smooth)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        if self.act_bits is not None:
            groups = x.numel() // x.shape[-1] if self.act_granularity == "token" else 1
            x = quantize_symmetric(x, self.act_bits, groups)
        return F.linear(x, self.w_dq, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, W{self.bits}"
            f"(group={self.group_size or 'tensor'}) A{self.act_bits or 'fp'}({self.act_granularity}), "
            f"smoothed={self.smooth is not None}"
        )


def _linears(model: nn.Module, recipe: PTQRecipe) -> list[str]:
    names: list[str] = []
    for pattern in recipe.modules:
        names += [n for n in select(model, pattern, "quantize_model.modules") if n not in names]
    return [
        n
        for n in names
        if isinstance(model.get_submodule(n), nn.Linear) and not any(e in n for e in recipe.exclude)
    ]


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[Any],
    names: list[str],
    hessian: bool,
    run: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, LayerStats]:
    """Run ``batches`` through ``model`` and collect each named linear layer's input statistics.

    ``run(model, batch)`` calls the model (default: ``model(**batch)`` for a dict, else ``model(batch)``).
    """
    stats: dict[str, LayerStats] = {}
    hooks = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            s = stats.get(name)
            if s is None:
                s = stats[name] = LayerStats(
                    torch.zeros(x.shape[-1]), torch.zeros(x.shape[-1], x.shape[-1]) if hessian else None
                )
            s.absmax = torch.maximum(s.absmax, x.abs().amax(0))
            if s.hessian is not None:
                s.hessian += x.t() @ x
            s.rows += x.shape[0]

        return hook

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_pre_hook(hook_for(name)))
    try:
        for batch in batches:
            if run is not None:
                run(model, batch)
            elif isinstance(batch, dict):
                model(**batch)
            else:
                model(batch)
    finally:
        for h in hooks:
            h.remove()
    return stats


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_j|**alpha / max|W_:,j|**(1 - alpha)`` (``1`` for dead channels)."""
    w_max = weight.detach().abs().amax(0).float().clamp_min(1e-5)
    a_max = act_absmax.float().clamp_min(1e-5)
    return (a_max.pow(alpha) / w_max.pow(1 - alpha)).clamp_min(1e-5)


def _round_column(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Integer codes of one column on the grid of :func:`deepshard.inference.quant.quantize`."""
    if zero is None:
        qmax = 2 ** (bits - 1) - 1
        return torch.round(w / scale).clamp(-qmax, qmax)
    return (torch.round(w / scale) + zero).clamp(0, 2**bits - 1)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, group: int) -> torch.Tensor:
    out_f, in_f = q.shape
    g = q.reshape(out_f, in_f // group, group).float()
    if zero is not None:
        g = g - zero[..., None]
    return (g * scale[..., None]).reshape(out_f, in_f)


def gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    symmetric: bool,
    damp: float = 0.01,
    block: int = 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """GPTQ: ``(q, scale, zero)`` of ``weight`` ``[out, in]`` given ``hessian`` ``[in, in]`` of its inputs.

    Scales are chosen per ``group_size`` columns (on the partly error-corrected weights, when the group is
    reached), on the grid of the inference engine's ``quantize``.
    """
    w = weight.detach().float().clone()
    out_f, in_f = w.shape
    if in_f % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_f}.")
    block = max(group_size, block // group_size * group_size)
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(in_f)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    groups = in_f // group_size
    scale = torch.zeros(out_f, groups)
    zero = None if symmetric else torch.zeros(out_f, groups)
    for b0 in range(0, in_f, block):
        b1 = min(b0 + block, in_f)
        w1 = w[:, b0:b1].clone()
        err = torch.zeros_like(w1)
        h1 = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:
                gi = col // group_size
                _, s, z = quantize(w1[:, i : i + group_size], bits, group_size, symmetric)
                scale[:, gi] = s[:, 0]
                if zero is not None and z is not None:
                    zero[:, gi] = z[:, 0]
            gi = col // group_size
            codes = _round_column(w1[:, i], scale[:, gi], None if zero is None else zero[:, gi], bits)
            q[:, col] = codes
            deq = (codes - (0 if zero is None else zero[:, gi])) * scale[:, gi]
            e = (w1[:, i] - deq) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]
    dtype = torch.int8 if symmetric else torch.uint8
    return q.to(dtype), scale, zero


def _quantize_weight(
    weight: torch.Tensor, recipe: PTQRecipe, stats: LayerStats | None
) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None, torch.Tensor]:
    gs = recipe.weight_group_size
    if gs is None:  # one scale per tensor: the per-tensor baseline (not exportable)
        w = weight.detach().float()
        qmax = 2 ** (recipe.weight_bits - 1) - 1
        s = w.abs().amax().clamp_min(torch.finfo(torch.float32).tiny) / qmax
        return None, torch.round(w / s).clamp(-qmax, qmax) * s
    if recipe.gptq:
        if stats is None or stats.hessian is None:
            raise ValueError("gptq=True needs calibration batches (pass calibration to quantize_model).")
        codes = gptq(weight, stats.hessian, recipe.weight_bits, gs, recipe.symmetric, recipe.gptq_damp)
    else:
        codes = quantize(weight, recipe.weight_bits, gs, recipe.symmetric)
    return codes, _dequantize(*codes, gs)


def quantize_model(
    model: nn.Module,
    recipe: PTQRecipe,
    calibration: Iterable[Any] | None = None,
    run: Callable[[nn.Module, Any], Any] | None = None,
) -> list[str]:
    """Replace the recipe's ``nn.Linear`` layers of ``model`` by :class:`PTQLinear`; returns their names.

    ``calibration`` (batches for ``run``, see :func:`calibrate`) is needed for ``smooth_alpha`` and ``gptq``.
    """
    names = _linears(model, recipe)
    if not names:
        raise ValueError(
            f"quantize_model: modules={recipe.modules} (exclude={recipe.exclude}) select no nn.Linear."
        )
    needs = recipe.smooth_alpha is not None or recipe.gptq
    if needs and calibration is None:
        raise ValueError("smooth_alpha / gptq need calibration batches; pass calibration=[...].")
    stats = (
        calibrate(model, calibration, names, recipe.gptq, run) if needs and calibration is not None else {}
    )
    for name in names:
        lin = model.get_submodule(name)
        assert isinstance(lin, nn.Linear)
        weight, smooth = lin.weight.detach(), None
        s = stats.get(name)
        if recipe.smooth_alpha is not None and s is not None:
            smooth = smoothing_factors(s.absmax, weight, recipe.smooth_alpha)
            weight = weight * smooth.to(weight.dtype)[None, :]
            if s.hessian is not None:  # the Hessian of the smoothed inputs x / s
                s.hessian = s.hessian / smooth[:, None] / smooth[None, :]
        codes, deq = _quantize_weight(weight, recipe, s)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, PTQLinear(weight, lin.bias, recipe, codes, deq, smooth))
    logger.info("quantize_model: %d linear layers, %s", len(names), recipe)
    return names


def export_packed(model: nn.Module) -> list[str]:
    """Replace every :class:`PTQLinear` by the inference engine's ``QuantizedLinear`` with the same integers.

    The result is weight-only (inputs are not quantized) and runs under ``deepshard.init_inference``.
    Raises ``ValueError`` for per-tensor or smoothed layers, which ``QuantizedLinear`` cannot hold.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, PTQLinear)]
    for name in names:
        m = model.get_submodule(name)
        assert isinstance(m, PTQLinear)
        if m.q is None or m.scale is None or m.group_size is None:
            raise ValueError(
                f"export_packed: '{name}' has one scale per tensor; QuantizedLinear stores group-wise "
                "scales. Quantize with weight_group_size set."
            )
        if m.smooth is not None:
            raise ValueError(
                f"export_packed: '{name}' is smoothed; fold 1/s into the preceding norm first (not "
                "implemented), or quantize without smooth_alpha."
            )
        # built through QuantizedLinear's own constructor (from the dequantized weight), then given the
        # exact integers and scales computed here (GPTQ's differ from what rounding the weight would give)
        source = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, dtype=m.w_dq.dtype)
        with torch.no_grad():
            source.weight.copy_(m.w_dq)
            if m.bias is not None:
                source.bias.copy_(m.bias)
        packed = QuantizedLinear(source, bits=m.bits, group_size=m.group_size, symmetric=m.symmetric)
        packed.qweight = pack_int4(m.q) if m.bits == 4 else m.q.clone()
        packed.scale = m.scale.clone()
        packed.zero = None if m.zero is None else m.zero.clone()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, packed)
    return names
