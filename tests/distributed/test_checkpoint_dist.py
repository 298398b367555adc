"""Checkpoints across ranks: save on 2, load on 1 and on 4 (stage 0), asynchronous saves on 2."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

import deepshard
from deepshard.testing.models import GPT, PRESETS
from deepshard.testing.parity import make_token_batches, max_relative_difference, train_engine

TINY = PRESETS["tiny"]
GLOBAL_BATCH = 4
BATCHES = make_token_batches(TINY.vocab_size, TINY.seq_len, GLOBAL_BATCH, 6, seed=5)


def _engine(world: int, precision: str | None = None):
    torch.manual_seed(0)
    model = GPT(TINY)
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
    }
    if precision:
        cfg[precision] = {"enabled": True}
    engine, _, _, _ = deepshard.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def _state(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}


def save_then_continue(root: str, precision: str | None, async_save: bool) -> dict[str, Any]:
    world = deepshard.comm.get_world_size()
    engine = _engine(world, precision)
    train_engine(engine, BATCHES[:3])
    saved = _state(engine)
    path = engine.save_checkpoint(root, async_save=async_save)
    losses = train_engine(engine, BATCHES[3:])  # overlaps the write when async
    engine.wait_for_checkpoint()
    return {"path": path, "saved": saved, "losses": losses}


def load_then_continue(root: str, precision: str | None) -> dict[str, Any]:
    world = deepshard.comm.get_world_size()
    engine = _engine(world, precision)
    path, _ = engine.load_checkpoint(root)
    loaded = _state(engine)
    return {"path": path, "loaded": loaded, "steps": engine.global_steps, "losses": train_engine(engine, BATCHES[3:])}


def test_save_on_2_load_on_1_and_4(dist2, dist4, tmp_path):
    root = str(tmp_path / "ck")
    saved = dist2.run(save_then_continue, root, None, False)
    files = sorted(p for p in os.listdir(saved[0]["path"]) if p.endswith(".distcp"))
    assert files == ["__0_0.distcp", "__1_0.distcp"]  # both ranks wrote part of the replicated state
    dcp_bytes = sum((Path(saved[0]["path"]) / f).stat().st_size for f in files)
    n = sum(p.numel() for p in GPT(TINY).parameters())
    assert dcp_bytes < 1.2 * 12 * n  # params + exp_avg + exp_avg_sq saved once, not once per rank
    assert sorted(p for p in os.listdir(saved[0]["path"]) if p.startswith("rank_")) == ["rank_00000.pt", "rank_00001.pt"]

    on4 = dist4.run(load_then_continue, root, None)
    on1 = load_then_continue(root, None)  # this process: no process group at all
    for result in [*on4, on1]:
        assert result["path"] == saved[0]["path"] and result["steps"] == 3
        for k, v in result["loaded"].items():
            assert torch.equal(v, saved[0]["saved"][k]), k
        # the same global batch split another way: equal up to float reordering of the reduction
        assert max_relative_difference(result["losses"], saved[0]["losses"]) <= 1e-5


def test_async_save_bf16_on_2(dist2, tmp_path):
    root = str(tmp_path / "ck")
    saved = dist2.run(save_then_continue, root, "bf16", True)
    loaded = dist2.run(load_then_continue, root, "bf16")
    for r in range(2):
        assert all(torch.equal(v, saved[0]["saved"][k]) for k, v in loaded[r]["loaded"].items())
        assert loaded[r]["losses"] == saved[r]["losses"]  # same ranks, same ops: exact
