"""Engine runs shared by the monitor tests (pickled by reference onto the harness's ranks)."""

from __future__ import annotations

import os
from typing import Any

import torch

import deepshard
from deepshard.testing.models import GPT, PRESETS
from deepshard.testing.parity import make_token_batches, rank_slice

MICRO = 2
STEPS = 3


def train_tiny(extra: dict[str, Any], steps: int = STEPS, gas: int = 1, world: int = 1) -> dict[str, Any]:
    """Train the tiny GPT for ``steps`` optimizer steps; returns per-step losses of this rank, the
    engine's counters and the global mean loss of each step (what rank 0's monitor should write)."""
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = GPT(cfg)
    config = {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        **extra,
    }
    engine, *_ = deepshard.initialize(model=model, config=config)
    batches = make_token_batches(cfg.vocab_size, cfg.seq_len, MICRO * world, steps * gas, seed=1)
    rank = deepshard.comm.get_rank()
    local: list[float] = []
    for x, y in batches:
        xs, ys = rank_slice((x, y), rank, world)
        loss = engine(xs, ys)
        engine.backward(loss)
        engine.step()
        local.append(float(loss.detach()))
    # global mean of each step's losses (every micro-batch of every rank weighs the same)
    per_micro = torch.tensor(local, dtype=torch.float64)
    gathered = [torch.zeros_like(per_micro) for _ in range(world)]
    deepshard.comm.all_gather(gathered, per_micro)
    step_means = torch.stack(gathered).reshape(world, steps, gas).mean(dim=(0, 2)).tolist()
    out = {
        "rank": rank,
        "step_means": step_means,
        "samples": engine.global_samples,
        "train_batch": engine.train_batch_size(),
        "lr": engine.get_lr()[0],
        "cwd_files": sorted(os.listdir(".")),
    }
    engine.destroy()
    return out
