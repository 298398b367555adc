"""The batch-size triad: every combination of given values, and every error."""

from __future__ import annotations

import re

import pytest

from deepshard.config import ConfigError, load_config

T, M, G = "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"


def resolved(ws: int, **given: object) -> tuple[int, int, int]:
    cfg = load_config(dict(given), dp_world_size=ws)
    return cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps


@pytest.mark.parametrize(
    ("given", "ws", "expected"),
    [
        ({T: 32, M: 4, G: 2}, 4, (32, 4, 2)),
        ({T: 32, M: 4}, 4, (32, 4, 2)),
        ({T: 32, G: 2}, 4, (32, 4, 2)),
        ({M: 4, G: 2}, 4, (32, 4, 2)),
        ({T: 32}, 4, (32, 8, 1)),
        ({M: 4}, 4, (16, 4, 1)),
        ({M: 4}, 1, (4, 4, 1)),
        ({T: 32.0, M: 4.0}, 2, (32, 4, 4)),
    ],
)
def test_derivation(given: dict, ws: int, expected: tuple[int, int, int]) -> None:
    assert resolved(ws, **given) == expected


def error(ws: int, **given: object) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(dict(given), dp_world_size=ws)
    return str(info.value)


def test_inconsistent_triad_names_numbers() -> None:
    msg = error(2, **{T: 32, M: 4, G: 2})
    assert msg.startswith(
        "train_batch_size=32 does not equal train_micro_batch_size_per_gpu * gradient_accumulation_steps * "
        "dp_world_size = 4 * 2 * 2 = 16"
    )


def test_train_not_divisible_by_micro_times_world() -> None:
    msg = error(2, **{T: 30, M: 4})
    assert (
        "train_batch_size=30 is not divisible by train_micro_batch_size_per_gpu * dp_world_size = 4 * 2 = 8"
        in msg
    )
    assert "multiple of 8" in msg


def test_train_not_divisible_by_gas_times_world() -> None:
    msg = error(4, **{T: 30, G: 2})
    assert (
        "train_batch_size=30 is not divisible by gradient_accumulation_steps * dp_world_size = 2 * 4 = 8"
        in msg
    )


def test_train_only_not_divisible_by_world() -> None:
    assert "= 1 * 4 = 4" in error(4, **{T: 6})


def test_no_batch_size() -> None:
    assert error(1).startswith("No batch size given: set train_batch_size, or train_micro_batch_size_per_gpu")
    assert error(1, **{G: 4}).startswith("No batch size given (only gradient_accumulation_steps=4 is set)")


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "8", [8]])
def test_values_must_be_positive_ints(bad: object) -> None:
    msg = error(1, **{T: 8, M: bad})
    assert re.match(r"train_micro_batch_size_per_gpu: got .*; expected a positive integer\.$", msg)


@pytest.mark.parametrize("ws", [0, -1])
def test_world_size_must_be_positive(ws: int) -> None:
    assert error(ws, **{T: 8}) == f"dp_world_size: got {ws}; expected a positive integer."
