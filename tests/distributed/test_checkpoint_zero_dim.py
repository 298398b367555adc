"""A 0-d parameter's optimizer state after resharding: on each rank it has the shape of the master rows.

The master of a 0-d parameter is one row that the group's rank 0 owns; every other rank holds an
empty shard. Loading a checkpoint saved on 2 ranks on 4 ranks must give those ranks empty
optimizer state too (it used to hold the whole scalar, 1 element, on every rank).
"""

from __future__ import annotations

from typing import Any

import torch

import deepshard
from deepshard.testing.models import GPT, PRESETS
from deepshard.testing.parity import make_token_batches, rank_slice

CFG = PRESETS["odd"]
BATCHES = make_token_batches(CFG.vocab_size, CFG.seq_len, 4, 2, seed=3)


def _engine(stage: int) -> Any:
    torch.manual_seed(0)
    model = GPT(CFG)
    model.register_parameter("scalar", torch.nn.Parameter(torch.tensor(0.5)))
    world = deepshard.comm.get_world_size()
    cfg = {
        "train_micro_batch_size_per_gpu": 4 // world,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
    }
    engine, _, _, _ = deepshard.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def _step(engine: Any, batch: Any) -> None:
    x, y = rank_slice(batch, deepshard.comm.get_rank(), deepshard.comm.get_world_size())
    engine.backward(engine(x, y))
    engine.step()


def save(root: str) -> None:
    engine = _engine(2)
    _step(engine, BATCHES[0])
    engine.save_checkpoint(root)


def load_and_inspect(root: str, stage: int) -> dict[str, Any]:
    """Shapes of the scalar's master rows and optimizer state on this rank, after the load and after a step."""
    engine = _engine(stage)
    engine.load_checkpoint(root)
    master = engine.masters.master_of(engine.module.scalar)

    def shapes() -> dict[str, Any]:
        state = engine.optimizer.state[master]
        return {
            "master": tuple(master.shape),
            **{k: tuple(v.shape) for k, v in state.items() if v.dim() > 0 or k != "step"},
        }

    loaded = shapes()
    _step(engine, BATCHES[1])
    return {"loaded": loaded, "stepped": shapes()}


def test_zero_dim_state_after_2_to_4(dist2, dist4, tmp_path):
    root = str(tmp_path / "ckpt")
    dist2.run(save, root)
    for stage in (1, 2):
        for rank, got in enumerate(dist4.run(load_and_inspect, root, stage)):
            rows = (1,) if rank == 0 else (0,)
            for when in ("loaded", "stepped"):
                assert got[when] == {"master": rows, "exp_avg": rows, "exp_avg_sq": rows}, (
                    stage,
                    rank,
                    when,
                    got,
                )
