"""The batch-size triad: ``train_batch_size = micro_batch * gradient_accumulation_steps * dp_world_size``.

DeepSpeed's rules: any two given derive the third; only ``train_batch_size`` or only
``train_micro_batch_size_per_gpu`` given means one accumulation step; all three given must agree;
neither batch size given is an error. Unlike DeepSpeed, which floors the division and then fails
an assertion, a division that does not come out even is reported with the numbers involved.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from deepshard.config.errors import ConfigError, show

TRAIN = "train_batch_size"
MICRO = "train_micro_batch_size_per_gpu"
GAS = "gradient_accumulation_steps"


@dataclass(frozen=True)
class BatchTriad:
    """The three resolved batch-size numbers."""

    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int


def _positive_int(key: str, value: Any) -> int | None:
    """``None`` when absent; otherwise a positive int (integral floats such as ``32.0`` accepted)."""
    if value is None:
        return None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{key}: got {show(value)}; expected a positive integer.")
    return value


def _exact_div(numerator: int, denominator: int, what: str, fix: str) -> int:
    if numerator % denominator:
        raise ConfigError(f"{what}; {fix}")
    return numerator // denominator


def resolve_batch_triad(
    train_batch_size: Any, micro_batch_size: Any, accumulation_steps: Any, dp_world_size: int
) -> BatchTriad:
    """Derive and check the triad for ``dp_world_size`` data-parallel ranks; absent values are ``None``.

    Raises :class:`ConfigError` naming the keys and numbers when a value is not a positive integer,
    when a derived value is not a whole number, or when the three given values disagree.
    """
    if isinstance(dp_world_size, bool) or not isinstance(dp_world_size, int) or dp_world_size <= 0:
        raise ConfigError(f"dp_world_size: got {show(dp_world_size)}; expected a positive integer.")
    train = _positive_int(TRAIN, train_batch_size)
    micro = _positive_int(MICRO, micro_batch_size)
    gas = _positive_int(GAS, accumulation_steps)
    ws = dp_world_size

    if train is None and micro is None:
        given = f" (only {GAS}={gas} is set)" if gas is not None else ""
        raise ConfigError(
            f"No batch size given{given}: set {TRAIN}, or {MICRO} (and optionally {GAS}); "
            f"{TRAIN} = {MICRO} * {GAS} * dp_world_size."
        )
    if train is None:
        assert micro is not None
        gas = 1 if gas is None else gas
        return BatchTriad(micro * gas * ws, micro, gas)
    if micro is None:
        gas = 1 if gas is None else gas
        micro = _exact_div(
            train,
            gas * ws,
            f"{TRAIN}={train} is not divisible by {GAS} * dp_world_size = {gas} * {ws} = {gas * ws}",
            f"choose a {TRAIN} that is a multiple of {gas * ws}, or set {MICRO} explicitly.",
        )
        return BatchTriad(train, micro, gas)
    if gas is None:
        gas = _exact_div(
            train,
            micro * ws,
            f"{TRAIN}={train} is not divisible by {MICRO} * dp_world_size = {micro} * {ws} = {micro * ws}",
            f"choose a {TRAIN} that is a multiple of {micro * ws}.",
        )
        return BatchTriad(train, micro, gas)
    if train != micro * gas * ws:
        raise ConfigError(
            f"{TRAIN}={train} does not equal {MICRO} * {GAS} * dp_world_size = "
            f"{micro} * {gas} * {ws} = {micro * gas * ws}; set two of the three and let the third be derived."
        )
    return BatchTriad(train, micro, gas)
