"""Learning-rate schedules of the ``scheduler`` config section, with DeepSpeed's formulas and defaults.

The five DeepSpeed schedules (``WarmupLR``, ``WarmupDecayLR``, ``WarmupCosineLR``, ``OneCycle``,
``LRRangeTest``) are stepped once per optimizer step. ``last_batch_iteration`` is the index of the
batch just trained: ``-1`` before training, so the first ``step()`` computes the lr for iteration 0.
Constructed with ``last_batch_iteration=-1`` each schedule writes its starting lr into the optimizer
right away, as DeepSpeed does; resuming passes the saved iteration instead and nothing is written
until the next ``step()``. ``state_dict()`` holds only ``last_batch_iteration``, the same as DeepSpeed,
so checkpoints load either way.

Any other ``torch.optim.lr_scheduler`` class that needs only JSON values (``StepLR``, ``CosineAnnealingLR``,
``OneCycleLR``, ...) is accepted by name too, as DeepSpeed does.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.optim import Optimizer

from deepshard.config.errors import ConfigError, did_you_mean
from deepshard.runtime._params import check_param_names, check_required, signature_params

__all__ = [
    "LRRangeTest",
    "LRSchedulerLike",
    "OneCycle",
    "WarmupCosineLR",
    "WarmupDecayLR",
    "VALID_LR_SCHEDULES",
    "WarmupLR",
    "build_lr_scheduler",
    "scheduler_choices",
    "write_current_lr",
]

logger = logging.getLogger(__name__)

WARMUP_TYPES = ("log", "linear")


@runtime_checkable
class LRSchedulerLike(Protocol):
    """What the engine needs from a scheduler: DeepSpeed's schedules and torch's both satisfy it."""

    def step(self) -> None: ...

    def get_last_lr(self) -> list[Any]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"scheduler.params.{name} must be a number, got {value!r}.")
    return float(value)


def _integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"scheduler.params.{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def _per_group(name: str, value: Any, optimizer: Optimizer) -> list[float]:
    """A scalar broadcast to every param group, or one value per group."""
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(
                f"scheduler.params.{name} has {len(value)} values but the optimizer has {n} param groups; "
                f"give one value per group or a single number."
            )
        return [_number(name, v) for v in value]
    return [_number(name, value)] * n


def _warmup_type(value: Any) -> str:
    if value not in WARMUP_TYPES:
        raise ConfigError(
            f"scheduler.params.warmup_type is {value!r}.{did_you_mean(str(value), WARMUP_TYPES)} "
            f"Choose 'log' or 'linear'."
        )
    return str(value)


class _Schedule:
    """Mechanics shared by the DeepSpeed schedules: iteration counter, writing lrs, state."""

    def __init__(self, optimizer: Optimizer, last_batch_iteration: int) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self.last_batch_iteration = _integer("last_batch_iteration", last_batch_iteration, -1)
        self._last_lr: list[float] | None = None

    def get_lr(self) -> list[float]:
        """The lr of each param group at ``last_batch_iteration``."""
        raise NotImplementedError

    def step(self, last_batch_iteration: int | None = None) -> None:
        """Advance to the next iteration (or jump to ``last_batch_iteration``) and write its lrs."""
        self.last_batch_iteration = (
            self.last_batch_iteration + 1 if last_batch_iteration is None else last_batch_iteration
        )
        self._write_lrs(self.get_lr())

    def get_last_lr(self) -> list[float]:
        """The lrs written by the latest ``step()`` (or by the constructor)."""
        if self._last_lr is None:
            raise RuntimeError(f"{type(self).__name__}.get_last_lr() needs a step() first")
        return self._last_lr

    def state_dict(self) -> dict[str, Any]:
        """DeepSpeed-compatible state: the iteration counter only."""
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the iteration counter; the lrs are written by the next ``step()``."""
        self.last_batch_iteration = state_dict["last_batch_iteration"]

    def _write_lrs(self, lrs: list[float]) -> None:
        _set_lrs(self.optimizer, lrs)
        self._last_lr = list(lrs)


def _set_lrs(optimizer: Optimizer, lrs: list[Any]) -> None:
    for group, lr in zip(optimizer.param_groups, lrs):
        if isinstance(group["lr"], Tensor):
            group["lr"].fill_(lr)  # keep a tensor lr a tensor (capturable / compiled optimizers)
        else:
            group["lr"] = lr


def _warmup_gamma(iteration: int, warmup_num_steps: int, warmup_type: str) -> float:
    """Fraction of the warmup done at ``iteration`` (< warmup_num_steps): log or linear in the step."""
    if warmup_type == "log":
        return math.log(iteration + 1) / math.log(warmup_num_steps)
    return iteration / warmup_num_steps


class WarmupLR(_Schedule):
    """Raise the lr from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps``, then hold it.

    ``lr(i) = min + (max - min) * g(i)`` with ``g = log(i+1)/log(W)`` ("log") or ``i/W`` ("linear") for
    ``i < W`` and ``1`` after, where ``W = max(2, warmup_num_steps)``. ``warmup_max_lr`` defaults to
    the optimizer's lr (of its first param group), as in current DeepSpeed.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_min_lr: float | list[float] = 0.0,
        warmup_max_lr: float | list[float] | None = None,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ) -> None:
        super().__init__(optimizer, last_batch_iteration)
        if warmup_max_lr is None:
            warmup_max_lr = float(optimizer.param_groups[0]["lr"])
        self.min_lrs = _per_group("warmup_min_lr", warmup_min_lr, optimizer)
        self.max_lrs = _per_group("warmup_max_lr", warmup_max_lr, optimizer)
        self.delta_lrs = [hi - lo for hi, lo in zip(self.max_lrs, self.min_lrs)]
        self.warmup_num_steps = max(2, _integer("warmup_num_steps", warmup_num_steps, 1))
        self.warmup_type = _warmup_type(warmup_type)
        if self.last_batch_iteration == -1:
            self._write_lrs(self.get_lr())

    def _gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return _warmup_gamma(self.last_batch_iteration, self.warmup_num_steps, self.warmup_type)
        return 1.0

    def get_lr(self) -> list[float]:
        """``min + delta * gamma`` per group; the minimum before the first step."""
        if self.last_batch_iteration < 0:
            return list(self.min_lrs)
        gamma = self._gamma()
        return [lo + d * gamma for lo, d in zip(self.min_lrs, self.delta_lrs)]


class WarmupDecayLR(WarmupLR):
    """``WarmupLR``, then a linear decay that reaches 0 at ``total_num_steps``.

    After warmup ``g(i) = max(0, (T - i) / max(1, T - W))``. ``warmup_max_lr`` defaults to ``0.001``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_num_steps: int,
        warmup_min_lr: float | list[float] = 0.0,
        warmup_max_lr: float | list[float] = 0.001,
        warmup_num_steps: int = 1000,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ) -> None:
        self.total_num_steps = _integer("total_num_steps", total_num_steps, 1)
        super().__init__(
            optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type, last_batch_iteration
        )
        if self.total_num_steps < self.warmup_num_steps:
            logger.warning(
                "total_num_steps %d is less than warmup_num_steps %d", total_num_steps, warmup_num_steps
            )

    def _gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return super()._gamma()
        decay_span = max(1.0, float(self.total_num_steps - self.warmup_num_steps))
        return max(0.0, float(self.total_num_steps - self.last_batch_iteration) / decay_span)


class WarmupCosineLR(_Schedule):
    """Warm the lr ratio up from ``warmup_min_ratio`` to 1, then cosine-decay it to ``cos_min_ratio``.

    The lr is ``ratio * lr0`` with ``lr0`` the optimizer's lr at construction. During warmup
    ``ratio = r0 + (1 - r0) * g(i)``; after it, with ``p = min(1, (i - W + 1) / max(1, T - W))``,
    ``ratio = max(0, c + (1 - c) * (1 + cos(pi * p)) / 2)``. Before the first step the lr is 0.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_num_steps: int,
        warmup_min_ratio: float = 0.0,
        warmup_num_steps: int = 1000,
        cos_min_ratio: float = 0.0001,
        warmup_type: str = "log",
        last_batch_iteration: int = -1,
    ) -> None:
        super().__init__(optimizer, last_batch_iteration)
        self.total_num_steps = _integer("total_num_steps", total_num_steps, 1)
        self.warmup_min_ratio = _number("warmup_min_ratio", warmup_min_ratio)
        self.cos_min_ratio = _number("cos_min_ratio", cos_min_ratio)
        self.warmup_num_steps = max(2, _integer("warmup_num_steps", warmup_num_steps, 1))
        self.warmup_type = _warmup_type(warmup_type)
        if self.total_num_steps < self.warmup_num_steps:
            logger.warning(
                "total_num_steps %d is less than warmup_num_steps %d", total_num_steps, warmup_num_steps
            )
        self.org_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        if self.last_batch_iteration == -1:
            self._write_lrs(self.get_lr())

    def get_lr_ratio(self) -> float:
        """The multiplier of the initial lr at ``last_batch_iteration``."""
        i = self.last_batch_iteration
        if i < 0:
            return 0.0
        if i < self.warmup_num_steps:
            gamma = _warmup_gamma(i, self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + gamma * (1.0 - self.warmup_min_ratio)
        progress = min(
            1.0, (i - self.warmup_num_steps + 1) / max(1, self.total_num_steps - self.warmup_num_steps)
        )
        cosine = (1.0 + math.cos(math.pi * progress)) / 2.0
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def get_lr(self) -> list[float]:
        """``org_lr * get_lr_ratio()`` per group."""
        ratio = self.get_lr_ratio()
        return [lr * ratio for lr in self.org_lrs]


class OneCycle(_Schedule):
    """1Cycle (Smith, 2018): lr up from ``cycle_min_lr`` to ``cycle_max_lr`` and back, then decay.

    With ``b = i + 1``, ``S = first + second`` step sizes and ``x = b/S - floor(b/S)``, the scale is
    ``x / (first/S)`` on the way up and ``(x - 1) / (first/S - 1)`` on the way down, quantised to
    ``floor(k*stairs)/stairs`` when a stair count is set; ``lr = min + (max - min) * scale`` while
    ``i < S``. Afterwards ``lr = min / (1 + decay_lr_rate * (i - S + 1) / decay_step_size)``
    (no decay when either is 0). Momentum moves inversely, ``mom = max_mom - (max_mom - min_mom) * scale``,
    then ``max_mom * (1 + decay_mom_rate * ...)``. It is written to ``betas[0]`` (beta2 is kept) for
    optimizers with ``betas``, to ``momentum`` for those with ``momentum`` (SGD, RMSprop); for others
    cycling is switched off with a warning.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        cycle_min_lr: float,
        cycle_max_lr: float,
        decay_lr_rate: float = 0.0,
        cycle_first_step_size: int = 2000,
        cycle_second_step_size: int | None = None,
        cycle_first_stair_count: int = 0,
        cycle_second_stair_count: int | None = None,
        decay_step_size: int = 0,
        cycle_momentum: bool = True,
        cycle_min_mom: float = 0.8,
        cycle_max_mom: float = 0.9,
        decay_mom_rate: float = 0.0,
        last_batch_iteration: int = -1,
    ) -> None:
        super().__init__(optimizer, last_batch_iteration)
        self.first_step_size = float(_integer("cycle_first_step_size", cycle_first_step_size, 1))
        self.second_step_size = (
            self.first_step_size
            if cycle_second_step_size is None
            else float(_integer("cycle_second_step_size", cycle_second_step_size, 0))
        )
        self.total_size = self.first_step_size + self.second_step_size
        self.step_ratio = self.first_step_size / self.total_size
        self.first_stair_count = _integer("cycle_first_stair_count", cycle_first_stair_count, 0)
        self.second_stair_count = (
            self.first_stair_count
            if cycle_second_stair_count is None
            else _integer("cycle_second_stair_count", cycle_second_stair_count, 0)
        )
        self.decay_step_size = _integer("decay_step_size", decay_step_size, 0)
        n = len(optimizer.param_groups)
        self.min_lrs = [_number("cycle_min_lr", cycle_min_lr)] * n
        self.max_lrs = [_number("cycle_max_lr", cycle_max_lr)] * n
        self.decay_lr_rate = _number("decay_lr_rate", decay_lr_rate)
        self.min_mom = _number("cycle_min_mom", cycle_min_mom)
        self.max_mom = _number("cycle_max_mom", cycle_max_mom)
        self.decay_mom_rate = _number("decay_mom_rate", decay_mom_rate)
        self.skip_lr_decay = self.decay_step_size == 0 or self.decay_lr_rate == 0.0
        self.skip_mom_decay = self.decay_step_size == 0 or self.decay_mom_rate == 0.0
        self.momentum_key = self._momentum_key(optimizer) if cycle_momentum else None
        self.cycle_momentum = self.momentum_key is not None
        if self.last_batch_iteration == -1:
            self._write_lrs(list(self.min_lrs))
            if self.cycle_momentum:
                self._write_momentum(self.min_mom)

    @staticmethod
    def _momentum_key(optimizer: Optimizer) -> str | None:
        for key in ("betas", "momentum"):
            if key in optimizer.defaults:
                return key
        logger.warning(
            "OneCycle: cycle_momentum is switched off because %s has neither 'betas' nor 'momentum'",
            type(optimizer).__name__,
        )
        return None

    def _scale_factor(self) -> float:
        batch_iteration = self.last_batch_iteration + 1
        cycle = math.floor(1 + batch_iteration / self.total_size)
        x = 1.0 + batch_iteration / self.total_size - cycle
        if x <= self.step_ratio:
            scale, stairs = x / self.step_ratio, self.first_stair_count
        else:
            scale, stairs = (x - 1) / (self.step_ratio - 1), self.second_stair_count
        if stairs > 0:
            # Quantise from the integer offset in the cycle, not from the float scale, so that a stair
            # boundary is never lost to rounding (DeepSpeed does the same).
            in_cycle = batch_iteration % self.total_size
            if in_cycle <= self.first_step_size:
                position = in_cycle * stairs / self.first_step_size
            else:
                position = (self.total_size - in_cycle) * stairs / self.second_step_size
            scale = math.floor(position) / stairs
        return scale

    def _decay_interval(self) -> float:
        return (self.last_batch_iteration - self.total_size + 1) / self.decay_step_size

    def get_lr(self) -> list[float]:
        """The cycle lr while ``last_batch_iteration < total_size``, the decayed lr after."""
        if self.last_batch_iteration < self.total_size:
            scale = self._scale_factor()
            return [lo + (hi - lo) * scale for lo, hi in zip(self.min_lrs, self.max_lrs)]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        return [lo / (1.0 + self.decay_lr_rate * self._decay_interval()) for lo in self.min_lrs]

    def get_mom(self) -> float | None:
        """The momentum (``betas[0]`` or ``momentum``) at ``last_batch_iteration``; None when not cycled."""
        if not self.cycle_momentum:
            return None
        if self.last_batch_iteration < self.total_size:
            return self.max_mom - (self.max_mom - self.min_mom) * self._scale_factor()
        if self.skip_mom_decay:
            return self.max_mom
        return self.max_mom * (1.0 + self.decay_mom_rate * self._decay_interval())

    def step(self, last_batch_iteration: int | None = None) -> None:
        """Advance one iteration and write both lr and (when cycled) momentum."""
        super().step(last_batch_iteration)
        momentum = self.get_mom()
        if momentum is not None:
            self._write_momentum(momentum)

    def _write_momentum(self, momentum: float) -> None:
        for group in self.optimizer.param_groups:
            if self.momentum_key == "betas":
                group["betas"] = (momentum, group["betas"][1])
            else:
                group["momentum"] = momentum


class LRRangeTest(_Schedule):
    """Grow the lr from ``lr_range_test_min_lr`` to find the largest lr that still trains.

    ``lr(i) = min_lr * (1 + step_rate * k)`` with ``k = (i + 1) / step_size``, floored when
    ``lr_range_test_staircase``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        lr_range_test_min_lr: float | list[float] = 1e-3,
        lr_range_test_step_size: int = 2000,
        lr_range_test_step_rate: float = 1.0,
        lr_range_test_staircase: bool = False,
        last_batch_iteration: int = -1,
    ) -> None:
        super().__init__(optimizer, last_batch_iteration)
        self.min_lrs = _per_group("lr_range_test_min_lr", lr_range_test_min_lr, optimizer)
        self.step_size = _integer("lr_range_test_step_size", lr_range_test_step_size, 1)
        self.step_rate = _number("lr_range_test_step_rate", lr_range_test_step_rate)
        if not isinstance(lr_range_test_staircase, bool):
            raise ConfigError(
                f"scheduler.params.lr_range_test_staircase must be true or false, got {lr_range_test_staircase!r}."
            )
        self.staircase = lr_range_test_staircase
        if self.last_batch_iteration == -1:
            self._write_lrs(list(self.min_lrs))

    def get_lr(self) -> list[float]:
        """``min_lr * (1 + step_rate * interval)`` per group."""
        interval = (self.last_batch_iteration + 1) / self.step_size
        if self.staircase:
            interval = math.floor(interval)
        return [lo * (1.0 + self.step_rate * interval) for lo in self.min_lrs]


_DEEPSPEED_SCHEDULES: dict[str, type[_Schedule]] = {
    cls.__name__.lower(): cls for cls in (LRRangeTest, OneCycle, WarmupLR, WarmupDecayLR, WarmupCosineLR)
}
VALID_LR_SCHEDULES = [cls.__name__ for cls in _DEEPSPEED_SCHEDULES.values()]
"""DeepSpeed's schedule names (accelerate tells a DeepSpeed schedule from its own by these)."""


def write_current_lr(scheduler: Any, optimizer: Optimizer) -> bool:
    """Write the lr of ``scheduler``'s current position into ``optimizer``'s param groups.

    Used after a checkpoint restored the schedule but not the optimizer state, whose lr would
    otherwise stay at the fresh schedule's first value (0 during a warmup from 0) for the next step.
    Returns ``False`` for a scheduler that cannot tell its current lr (neither a DeepSpeed schedule nor
    a ``torch.optim.lr_scheduler.LRScheduler``).
    """
    lrs: list[Any]
    if isinstance(scheduler, _Schedule):
        lrs = scheduler.get_lr()
    elif isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        lrs = scheduler.get_last_lr()  # part of its state_dict
    else:
        return False
    _set_lrs(optimizer, lrs)
    return True
# torch schedulers whose constructors need Python objects (callables, other schedulers) or whose step()
# needs a metric; a JSON config cannot drive them.
_TORCH_EXCLUDED = frozenset(
    {
        "LRScheduler",
        "_LRScheduler",
        "LambdaLR",
        "MultiplicativeLR",
        "SequentialLR",
        "ChainedScheduler",
        "ReduceLROnPlateau",
    }
)


def _torch_schedules() -> dict[str, type]:
    found: dict[str, type] = {}
    for name in dir(torch.optim.lr_scheduler):
        obj = getattr(torch.optim.lr_scheduler, name)
        if (
            isinstance(obj, type)
            and issubclass(obj, torch.optim.lr_scheduler.LRScheduler)
            and name not in _TORCH_EXCLUDED
        ):
            found[name.lower()] = obj
    return found


def scheduler_choices() -> list[str]:
    """Every scheduler ``type`` that :func:`build_lr_scheduler` accepts, in display spelling."""
    deepspeed = [cls.__name__ for cls in _DEEPSPEED_SCHEDULES.values()]
    return deepspeed + sorted(cls.__name__ for cls in _torch_schedules().values())


def build_lr_scheduler(type_name: str, params: Mapping[str, Any], optimizer: Optimizer) -> LRSchedulerLike:
    """Build the schedule of a config's ``scheduler`` section and write its first lr into ``optimizer``.

    Args:
        type_name: ``scheduler.type``: a DeepSpeed schedule or a ``torch.optim.lr_scheduler`` class name
            (case-insensitive).
        params: ``scheduler.params``, the constructor keywords (DeepSpeed's names and defaults).
        optimizer: the optimizer whose param groups' lr (and momentum, for OneCycle) are driven.

    Raises:
        ConfigError: unknown type or parameter (with a suggestion), a missing required parameter, an
            unresolved ``"auto"``, or an invalid value.
    """
    key = type_name.lower()
    cls = _DEEPSPEED_SCHEDULES.get(key) or _torch_schedules().get(key)
    if cls is None:
        choices = scheduler_choices()
        raise ConfigError(
            f"scheduler.type '{type_name}' is not a known LR schedule.{did_you_mean(type_name, choices)} "
            f"Choose one of: {', '.join(choices)}."
        )
    owner = cls.__name__ if key in _DEEPSPEED_SCHEDULES else f"torch.optim.lr_scheduler.{cls.__name__}"
    check_param_names("scheduler", owner, params, signature_params(cls))
    check_required("scheduler", owner, params, cls)
    try:
        scheduler = cls(optimizer, **params)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"scheduler '{type_name}' rejected scheduler.params {dict(params)}: {exc}. "
            f"Fix the value in the config."
        ) from exc
    logger.info("lr scheduler %s with %s", owner, dict(params))
    return scheduler
