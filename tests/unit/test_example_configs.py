"""Every config shipped in examples/configs/ is accepted by the config loader (as the README promises)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepshard.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "examples" / "configs").glob("*.json"))


def test_there_are_example_configs():
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_loads(path):
    cfg = load_config(str(path), dp_world_size=2)
    assert cfg.train_micro_batch_size_per_gpu >= 1
