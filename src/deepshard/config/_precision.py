"""The mixed-precision sections: ``fp16``, ``bf16`` (alias ``bfloat16``) and ``data_types``.

Defaults follow DeepSpeed's ``deepspeed/runtime/precision_config.py`` and ``constants.py``.
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from deepshard.config._types import DType, Float, Int, StrictModel, Unsupported, equals, unsupported


class FP16Config(StrictModel):
    """``fp16``: fp16 mixed precision with a static or dynamic loss scale."""

    NOT_SUPPORTED: ClassVar[dict[str, Unsupported]] = {
        "fp16_master_weights_and_grads": unsupported(
            "keeps master weights and gradients in fp16 (ZeRO-Offload with DeepSpeedCPUAdam only)",
            equals(False),
        ),
    }

    enabled: bool = Field(
        default=False, description="Train in fp16 mixed precision. Cannot be combined with `bf16.enabled`."
    )
    auto_cast: bool = Field(
        default=False, description="Cast floating-point inputs of the model's forward to fp16."
    )
    loss_scale: Float = Field(
        default=0.0, ge=0.0, description="Static loss scale; `0` selects dynamic loss scaling (the default)."
    )
    initial_scale_power: Int = Field(
        default=16, ge=0, description="Dynamic loss scaling starts at a scale of `2**initial_scale_power`."
    )
    loss_scale_window: Int = Field(
        default=1000,
        ge=1,
        description="Dynamic loss scaling raises the scale after this many steps without overflow.",
    )
    hysteresis: Int = Field(
        default=2,
        ge=1,
        description="Dynamic loss scaling lowers the scale only after this many consecutive overflows.",
    )
    consecutive_hysteresis: bool = Field(
        default=False, description="Refill the hysteresis budget after every step that does not overflow."
    )
    min_loss_scale: Int = Field(default=1, ge=0, description="Lower bound of the dynamic loss scale.")

    @property
    def dynamic_loss_scale(self) -> bool:
        """True when the loss scale is dynamic (``loss_scale == 0``)."""
        return self.loss_scale == 0.0

    @property
    def initial_dynamic_scale(self) -> float:
        """The first dynamic loss scale, ``2 ** initial_scale_power``."""
        return float(2**self.initial_scale_power)


class BF16Config(StrictModel):
    """``bf16``: bfloat16 mixed precision (no loss scaling). DeepSpeed's older name ``bfloat16`` is accepted."""

    NOT_SUPPORTED: ClassVar[dict[str, Unsupported]] = {
        "bf16_master_weights_and_grads": unsupported(
            "keeps ZeRO master weights and gradients in bf16 instead of fp32", equals(False)
        ),
        "bf16_optimizer_states": unsupported("keeps optimizer states in bf16", equals(False)),
    }

    enabled: bool = Field(
        default=False, description="Train in bf16 mixed precision. Cannot be combined with `fp16.enabled`."
    )
    immediate_grad_update: bool = Field(
        default=False,
        description="Accumulate each bf16 gradient into its fp32 gradient as soon as backward produces it, "
        "instead of once per accumulation boundary. DeepSpeed's pydantic model defaults to `false` "
        "(its legacy `constants.py` says `true`; the model is what DeepSpeed applies).",
    )
    check_grad_overflow: bool = Field(
        default=True,
        description="Check bf16 gradients for inf/NaN and skip the step when one is found (DeepSpeed 0.19.8's "
        "default, `true`: one inf gradient skips the step instead of turning the parameters into NaN).",
    )


class DataTypesConfig(StrictModel):
    """``data_types``: dtypes of intermediate buffers."""

    NOT_SUPPORTED: ClassVar[dict[str, Unsupported]] = {
        "param_dtype": unsupported(
            "casts parameters to another dtype (FSDP-style mixed precision)", equals(None)
        ),
        "buffer_dtype": unsupported("casts module buffers to another dtype", equals(None)),
    }

    grad_accum_dtype: DType | None = Field(
        default=None,
        description="Dtype in which gradients are accumulated across micro-batches; `null` matches the "
        "model's training dtype. Accepts DeepSpeed's spellings (`fp32`/`float32`, `fp16`/`float16`/`half`, "
        "`bf16`/`bfloat16`), normalised to `fp32`, `fp16` or `bf16`.",
    )
