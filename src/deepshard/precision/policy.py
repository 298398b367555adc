"""Which dtypes parameters, gradients, master weights and collectives use, from the config.

| mode | module params | grad accumulation | master weights | on the wire (default) |
|------|---------------|-------------------|----------------|-----------------------|
| fp32 | fp32          | fp32              | the params     | fp32                  |
| bf16 | bf16          | fp32 (see below)  | fp32 copies    | bf16                  |
| fp16 | fp16          | fp16              | fp32 copies    | fp16                  |

At stage 0 with bf16, gradients are accumulated in fp32 when there is something to accumulate
(gradient accumulation over micro-batches, or an fp32 reduction) and kept in bf16 otherwise, which
gives identical numbers. DeepSpeed 0.19 keeps bf16 gradients at stage 0 in every case (and refuses
``grad_accum_dtype: fp32`` there); the fp32 accumulation is deliberately more accurate. With ZeRO
stages 1-3 gradients stay in the parameter dtype (so model state matches the ZeRO formulas);
``data_types.grad_accum_dtype`` overrides both. fp16 accumulates in fp16 under the loss scale, and
the wire dtype defaults to the parameter dtype unless ``communication_data_type`` says otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from deepshard.precision.loss_scaler import LossScaler

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_from_name(name: str) -> torch.dtype:
    """Map ``"fp32"``/``"fp16"``/``"bf16"`` to a torch dtype."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype name {name!r}; expected one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class PrecisionPolicy:
    """The dtypes of one training run, and whether gradient overflow skips a step."""

    param_dtype: torch.dtype = torch.float32
    grad_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32
    check_overflow: bool = False

    @property
    def needs_master(self) -> bool:
        """Whether the optimizer updates fp32 copies rather than the module's own parameters."""
        return self.param_dtype != torch.float32

    @classmethod
    def from_config(cls, cfg: Any) -> PrecisionPolicy:
        """Build the policy from a :class:`deepshard.config.DeepShardConfig`."""
        if cfg.fp16.enabled:
            param, grad, check = torch.float16, torch.float16, True
        elif cfg.bf16.enabled:
            param = torch.bfloat16
            # An fp32 buffer only changes results when something accumulates in it (several
            # micro-batches) or it is reduced in fp32; otherwise bf16 buffers give the same numbers
            # with half the memory and no extra copies (and match DeepSpeed's stage 0).
            accumulates = cfg.gradient_accumulation_steps > 1 or cfg.communication_data_type == "fp32"
            grad = torch.float32 if cfg.zero_optimization.stage == 0 and accumulates else torch.bfloat16
            check = bool(cfg.bf16.check_grad_overflow)
        else:
            param, grad, check = torch.float32, torch.float32, False
        accum = getattr(getattr(cfg, "data_types", None), "grad_accum_dtype", None)
        if accum is not None:
            grad = dtype_from_name(accum)
        wire = dtype_from_name(cfg.communication_data_type) if cfg.communication_data_type else param
        return cls(param_dtype=param, grad_dtype=grad, reduce_dtype=wire, check_overflow=check)


def loss_scaler_from_config(cfg: Any) -> LossScaler:
    """DeepSpeed's scaler: dynamic when ``fp16.loss_scale`` is 0, static otherwise; none without fp16."""
    fp16 = cfg.fp16
    if not fp16.enabled:
        return LossScaler(scale=1.0)
    if fp16.loss_scale == 0:
        return LossScaler.dynamic_scaler(
            initial_scale_power=fp16.initial_scale_power,
            scale_window=fp16.loss_scale_window,
            hysteresis=fp16.hysteresis,
            consecutive_hysteresis=fp16.consecutive_hysteresis,
            min_scale=fp16.min_loss_scale,
        )
    return LossScaler(scale=float(fp16.loss_scale))
