"""The loss scaler state machine against DeepSpeed's rules, with expected sequences written by hand.

DeepSpeed's ``DynamicLossScaler.update_scale`` (deepspeed/runtime/fp16/loss_scaler.py):

* overflow: if ``delayed_shift == 1`` or ``cur_hysteresis == 1`` the scale is divided by 2 (floored at
  ``min_scale``; raising when it is already there), otherwise one unit of hysteresis is spent;
  ``last_overflow_iter = cur_iter``;
* no overflow: with ``consecutive_hysteresis`` the hysteresis refills; then
  ``stable_interval = cur_iter - last_overflow_iter - 1`` and when ``stable_interval > 0`` and
  ``stable_interval % scale_window == 0`` the scale doubles (refilling the hysteresis when not consecutive);
* ``cur_iter += 1`` every update.
"""

from __future__ import annotations

import io

import pytest
import torch

from deepshard.config import load_config
from deepshard.precision import LossScaleAtMinimumError, LossScaler, loss_scaler_from_config

G, X = False, True  # good step, overflow


def _run(scaler: LossScaler, events: list[bool]) -> list[float]:
    """The scale after each update."""
    out = []
    for overflow in events:
        scaler.update(overflow)
        out.append(scaler.scale)
    return out


def _dynamic(
    scale: float, window: int = 1000, hysteresis: int = 2, consecutive: bool = False, min_scale: float = 1.0
):
    return LossScaler(
        scale=scale,
        dynamic=True,
        scale_window=window,
        hysteresis=hysteresis,
        consecutive_hysteresis=consecutive,
        min_scale=min_scale,
    )


def test_growth_after_window_of_good_steps_from_start():
    # window 3, no overflow yet (last_overflow_iter = -1): stable_interval at update i is i, so the scale
    # doubles at updates 3 and 6 (DeepSpeed's current rule; not at 2 and 5).
    scaler = _dynamic(16.0, window=3)
    assert _run(scaler, [G] * 7) == [16, 16, 16, 32, 32, 32, 64]
    assert scaler.cur_iter == 7


def test_growth_counts_from_the_last_overflow():
    # hysteresis 1: every overflow halves. Overflow at update 0 (64 -> 32); stable_interval at update i is
    # i - 0 - 1, so the next doubling is at update 1 + window = 3 (window 2), then at 5.
    scaler = _dynamic(64.0, window=2, hysteresis=1)
    assert _run(scaler, [X, G, G, G, G, G]) == [32, 32, 32, 64, 64, 128]


def test_hysteresis_delays_the_backoff():
    scaler = _dynamic(2.0**10, hysteresis=3)
    # the first two overflows only spend hysteresis; from then on every overflow halves (no refill
    # without a growth step or consecutive_hysteresis)
    assert _run(scaler, [X, X, X, X, G, X]) == [1024, 1024, 512, 256, 256, 128]
    assert scaler.cur_hysteresis == 1


def test_hysteresis_one_halves_immediately():
    scaler = _dynamic(256.0, hysteresis=1)
    assert _run(scaler, [X, X, G, X]) == [128, 64, 64, 32]


def test_hysteresis_refills_when_the_scale_grows():
    # hysteresis 2, window 2, timing-agnostic: spend all hysteresis, then feed good steps until the
    # scale doubles; after that growth the budget is full again, so the next overflow does not halve.
    scaler = _dynamic(1024.0, window=2, hysteresis=2)
    assert _run(scaler, [X, X]) == [1024, 512]
    assert scaler.cur_hysteresis == 1
    for _ in range(10):
        scaler.update(G)
        if scaler.scale == 1024:
            break
    assert scaler.scale == 1024
    assert scaler.cur_hysteresis == 2
    assert _run(scaler, [X, X]) == [1024, 512]


def test_consecutive_hysteresis_refills_after_every_good_step():
    with_refill = _dynamic(1024.0, hysteresis=3, consecutive=True)
    assert _run(with_refill, [X, G, X, X, X]) == [1024, 1024, 1024, 1024, 512]
    without = _dynamic(1024.0, hysteresis=3, consecutive=False)
    assert _run(without, [X, G, X, X]) == [1024, 1024, 1024, 512]


def test_consecutive_hysteresis_growth_keeps_refilled_budget():
    scaler = _dynamic(8.0, window=1, hysteresis=2, consecutive=True)
    # window 1: stable_interval > 0 on every good update after the first one following an overflow.
    assert _run(scaler, [G, G, X, G, G]) == [8, 16, 16, 16, 32]
    assert scaler.cur_hysteresis == 2


def test_min_scale_floor_then_error_at_minimum():
    scaler = _dynamic(3.0, hysteresis=1, min_scale=2.0)
    assert _run(scaler, [X]) == [2.0]  # max(3 / 2, 2)
    with pytest.raises(LossScaleAtMinimumError) as info:
        scaler.update(X)
    message = str(info.value)
    assert "minimum" in message and "2.0" in message
    # the message says what to do
    assert "min_loss_scale" in message and "gradient_clipping" in message and "bf16" in message


def test_error_at_minimum_respects_hysteresis():
    scaler = _dynamic(1.0, hysteresis=2, min_scale=1.0)
    scaler.update(X)  # spends hysteresis, does not touch the scale
    assert scaler.scale == 1.0
    with pytest.raises(LossScaleAtMinimumError, match="minimum"):
        scaler.update(X)


def test_no_error_at_minimum_when_disabled():
    scaler = _dynamic(2.0, hysteresis=1, min_scale=1.0)
    scaler.raise_error_at_min_scale = False
    assert _run(scaler, [X, X, X]) == [1.0, 1.0, 1.0]


def test_static_scale_never_changes():
    scaler = LossScaler(scale=128.0)
    assert scaler.enabled and not scaler.dynamic
    assert _run(scaler, [X, G, X, X, G]) == [128.0] * 5
    none = LossScaler()
    assert none.scale == 1.0 and not none.enabled
    none.update(X)
    assert none.scale == 1.0


@pytest.mark.parametrize("bad", [0.0, -4.0])
def test_non_positive_scale_is_refused(bad):
    with pytest.raises(ValueError, match=f"positive, got {bad}"):
        LossScaler(scale=bad)


def test_dynamic_scaler_factory():
    scaler = LossScaler.dynamic_scaler(initial_scale_power=5, scale_window=7, hysteresis=3, min_scale=0.5)
    assert scaler.dynamic and scaler.enabled
    assert (
        scaler.scale,
        scaler.scale_window,
        scaler.hysteresis,
        scaler.cur_hysteresis,
        scaler.min_scale,
    ) == (
        32.0,
        7,
        3,
        3,
        0.5,
    )


def test_state_dict_round_trip_resumes_exactly():
    events = [X, G, G, X, X, G, G, G, G, X, G, G, G, G, G, G, X, G]
    full = _dynamic(2.0**12, window=3, hysteresis=2)
    expected = _run(full, events)

    first = _dynamic(2.0**12, window=3, hysteresis=2)
    _run(first, events[:9])
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)

    resumed = _dynamic(2.0**12, window=3, hysteresis=2)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == first.state_dict()
    assert _run(resumed, events[9:]) == expected[9:]
    assert resumed.state_dict() == full.state_dict()


def _cfg(**fp16):
    return load_config({"train_batch_size": 1, "fp16": fp16})


def test_loss_scaler_from_config_dynamic():
    scaler = loss_scaler_from_config(
        _cfg(
            enabled=True,
            initial_scale_power=12,
            loss_scale_window=50,
            hysteresis=4,
            consecutive_hysteresis=True,
            min_loss_scale=8,
        )
    )
    assert scaler.dynamic
    assert (
        scaler.scale,
        scaler.scale_window,
        scaler.hysteresis,
        scaler.consecutive_hysteresis,
        scaler.min_scale,
    ) == (
        4096.0,
        50,
        4,
        True,
        8,
    )


def test_loss_scaler_from_config_defaults_match_deepspeed():
    scaler = loss_scaler_from_config(_cfg(enabled=True))
    assert scaler.dynamic
    assert (
        scaler.scale,
        scaler.scale_window,
        scaler.hysteresis,
        scaler.consecutive_hysteresis,
        scaler.min_scale,
    ) == (
        65536.0,
        1000,
        2,
        False,
        1,
    )


def test_loss_scaler_from_config_static_and_disabled():
    static = loss_scaler_from_config(_cfg(enabled=True, loss_scale=128))
    assert not static.dynamic and static.scale == 128.0
    off = loss_scaler_from_config(load_config({"train_batch_size": 1, "bf16": {"enabled": True}}))
    assert off.scale == 1.0 and not off.enabled
