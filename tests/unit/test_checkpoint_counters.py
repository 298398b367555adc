"""The engine's step counters cross the checkpoint boundary by name, never by setattr from a file."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from deepshard.checkpoint.state import COUNTERS, capture_counters, restore_counters


def _engine() -> SimpleNamespace:
    return SimpleNamespace(global_steps=3, global_samples=24, skipped_steps=1, micro_steps=6)


def test_counters_round_trip() -> None:
    saved = capture_counters(_engine())
    assert set(saved) == set(COUNTERS)
    fresh = SimpleNamespace(global_steps=0, global_samples=0, skipped_steps=0, micro_steps=0)
    restore_counters(fresh, saved)
    assert vars(fresh) == vars(_engine())


def test_a_partial_set_leaves_the_rest() -> None:
    engine = _engine()
    restore_counters(engine, {"global_steps": "7"})  # DeepSpeed files carry three of the four
    assert (engine.global_steps, engine.micro_steps) == (7, 6)


def test_unknown_names_from_a_file_are_refused() -> None:
    engine = _engine()
    with pytest.raises(ValueError, match=r"\['optimizer'\] are not engine counters"):
        restore_counters(engine, {"optimizer": 0})
    assert engine.global_steps == 3
