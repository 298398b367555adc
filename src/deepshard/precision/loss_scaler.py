"""The one loss scaler, used unchanged by every ZeRO stage.

fp16 gradients underflow unless the loss is multiplied by a large factor before backward. The scaler
owns that factor. ``update(overflow)`` runs once per optimizer step with DeepSpeed's dynamic rules:

* on overflow the step is skipped; the scale is divided by ``scale_factor`` once ``hysteresis``
  overflows have been seen (each overflow before that only spends one unit of hysteresis), never going
  below ``min_scale``; an overflow at ``min_scale`` is an error, as in DeepSpeed, because training can
  no longer make progress;
* once ``scale_window`` good updates have passed since the last overflow (DeepSpeed's current
  "stable interval" rule), the scale is multiplied by ``scale_factor`` and the hysteresis budget
  refills; with ``consecutive_hysteresis`` it refills after every good step instead.

A static scaler keeps its factor; the no-op scaler (fp32, bf16) has scale 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class LossScaleAtMinimumError(RuntimeError):
    """Gradients overflowed while the dynamic loss scale was already at ``min_loss_scale``."""


@dataclass
class LossScaler:
    """Loss scale state. ``dynamic=False`` gives a static scale (1.0 means no scaling)."""

    scale: float = 1.0
    dynamic: bool = False
    scale_factor: float = 2.0
    scale_window: int = 1000
    min_scale: float = 1.0
    hysteresis: int = 2
    consecutive_hysteresis: bool = False
    raise_error_at_min_scale: bool = True
    # Mutable state, checkpointed by ``state_dict``.
    cur_iter: int = 0
    last_overflow_iter: int = -1
    cur_hysteresis: int = 2

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise ValueError(f"loss scale must be positive, got {self.scale}; use 0 in the config for dynamic scaling")
        self.cur_hysteresis = self.hysteresis

    @classmethod
    def dynamic_scaler(
        cls,
        initial_scale_power: int = 16,
        scale_window: int = 1000,
        hysteresis: int = 2,
        consecutive_hysteresis: bool = False,
        min_scale: float = 1.0,
    ) -> LossScaler:
        """DeepSpeed's dynamic scaler starting at ``2**initial_scale_power``."""
        return cls(
            scale=float(2**initial_scale_power),
            dynamic=True,
            scale_window=scale_window,
            hysteresis=hysteresis,
            consecutive_hysteresis=consecutive_hysteresis,
            min_scale=min_scale,
        )

    @property
    def enabled(self) -> bool:
        """Whether the loss is multiplied at all."""
        return self.dynamic or self.scale != 1.0

    def update(self, overflow: bool) -> None:
        """Advance the state machine after one optimizer step (``overflow``: the step was skipped)."""
        if not self.dynamic:
            self.cur_iter += 1
            return
        if overflow:
            if self.hysteresis == 1 or self.cur_hysteresis == 1:
                if self.scale <= self.min_scale and self.raise_error_at_min_scale:
                    raise LossScaleAtMinimumError(
                        f"gradients overflowed with the loss scale already at its minimum ({self.min_scale}); "
                        "training cannot continue. Lower the learning rate, enable gradient_clipping, "
                        "switch to bf16, or lower fp16.min_loss_scale."
                    )
                self.scale = max(self.scale / self.scale_factor, self.min_scale)
            else:
                self.cur_hysteresis -= 1
            self.last_overflow_iter = self.cur_iter
        else:
            if self.consecutive_hysteresis:
                self.cur_hysteresis = self.hysteresis
            stable = self.cur_iter - self.last_overflow_iter - 1  # good updates since the last overflow
            if stable > 0 and stable % self.scale_window == 0:
                if not self.consecutive_hysteresis:
                    self.cur_hysteresis = self.hysteresis
                self.scale *= self.scale_factor
        self.cur_iter += 1

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the state machine exactly."""
        return {
            "scale": self.scale,
            "cur_iter": self.cur_iter,
            "last_overflow_iter": self.last_overflow_iter,
            "cur_hysteresis": self.cur_hysteresis,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.scale = float(state["scale"])
        self.cur_iter = int(state["cur_iter"])
        self.last_overflow_iter = int(state["last_overflow_iter"])
        self.cur_hysteresis = int(state["cur_hysteresis"])
