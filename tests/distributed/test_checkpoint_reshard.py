"""The resharding matrix: checkpoints saved at ZeRO stage 0-3 on 1, 2 or 4 ranks, loaded at another.

The "odd" model has dim-0 sizes (vocabulary 251, 33 positions, width 60) that divide by neither 2
nor 4, so shards are short; two extra parameters (unused in forward: zero gradients, weight decay
still moves them) give a 0-d master and a 3-row one whose last shard is empty on 4 ranks. Saves are grouped per harness call and each checkpoint is
loaded several times, to keep the spawned groups busy rather than many.

What "equal" means: after a load the module, the whole fp32 masters and the whole optimizer state
equal those of the saving run at the save exactly (any stage, any number of ranks). The losses of
the next steps equal the saving run's exactly at the same world size and stage; with another split
of the batch or another reduction (all-reduce vs reduce-scatter) they differ by float reordering
(fp32: <= 1e-5 relative; bf16, whose gradients are reduced in bf16 at stages 1-2: <= 2e-2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import deepshard
from deepshard.checkpoint import export_safetensors, get_fp32_state_dict_from_zero_checkpoint
from deepshard.checkpoint.load import tensor_metadata
from deepshard.testing.models import GPT, PRESETS
from deepshard.testing.parity import make_token_batches, max_relative_difference, train_engine
from deepshard.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

ODD = PRESETS["odd"]
GLOBAL_BATCH = 4
BATCHES = make_token_batches(ODD.vocab_size, ODD.seq_len, GLOBAL_BATCH, 6, seed=7)
SAVE_AT = 3
TOL = {"fp32": 1e-5, "bf16": 2e-2}


def _engine(world: int, stage: int, precision: str) -> Any:
    torch.manual_seed(0)
    model = GPT(ODD)
    model.register_parameter("scalar", torch.nn.Parameter(torch.tensor(0.5)))  # 0-d: one row, owned by rank 0
    model.register_parameter("three_rows", torch.nn.Parameter(torch.randn(3, 2)))  # 4 ranks: rows 1, 1, 1, 0
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "zero_optimization": {"stage": stage, "reduce_bucket_size": 20000, "allgather_bucket_size": 30000},
        "gradient_clipping": 1.0,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if stage == 3:  # every parameter sharded, the 0-d one and the 3-row one included
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    engine, _, _, _ = deepshard.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def _world() -> int:
    return deepshard.comm.get_world_size() if torch.distributed.is_initialized() else 1


def _full_state(engine: Any) -> dict[str, torch.Tensor]:
    """Collective: module state, whole fp32 masters and whole optimizer state, by name."""
    out = {f"model.{k}": v.float() for k, v in deepshard.zero.full_state_dict(engine.module).items()}
    for name, p in engine.module.named_parameters():
        out[f"master.{name}"] = safe_get_full_fp32_param(p).clone()
        for key in ("exp_avg", "exp_avg_sq"):
            out[f"{key}.{name}"] = safe_get_full_optimizer_state(p, key).clone()
    return out


def save_runs(root: str, precision: str, plans: list[tuple[str, int]]) -> dict[str, Any]:
    """For each ``(name, stage)``: train, save to ``root/name``, record the state, train on.

    Stage-1 saves are asynchronous: training goes on while the staged rows are written.
    """
    out = {}
    for name, stage in plans:
        engine = _engine(_world(), stage, precision)
        train_engine(engine, BATCHES[:SAVE_AT])
        state = _full_state(engine)
        engine.save_checkpoint(f"{root}/{name}", async_save=stage == 1)  # stage 1: written in the background
        out[name] = {"state": state, "losses": train_engine(engine, BATCHES[SAVE_AT:])}
        engine.wait_for_checkpoint()
    return out


def load_runs(root: str, precision: str, plans: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """For each ``(name, stage)``: load ``root/name`` into a fresh engine, record the state, train on."""
    out = []
    for name, stage in plans:
        engine = _engine(_world(), stage, precision)
        path, _ = engine.load_checkpoint(f"{root}/{name}")
        assert path is not None and engine.global_steps == SAVE_AT
        out.append({"state": _full_state(engine), "losses": train_engine(engine, BATCHES[SAVE_AT:])})
    return out


def _check(saved: dict[str, Any], loaded: dict[str, Any], tol: float | None, label: str) -> None:
    assert saved["state"].keys() == loaded["state"].keys(), label
    for k, v in saved["state"].items():
        assert torch.equal(loaded["state"][k], v), f"{label}: {k} differs after load"
    if tol is None:
        assert loaded["losses"] == saved["losses"], label
    else:
        assert max_relative_difference(loaded["losses"], saved["losses"]) <= tol, label


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resharding_matrix(precision, dist2, dist4, tmp_path):
    root, tol = str(tmp_path), TOL[precision]
    # saved on 2 ranks: stage 2 (A), stage 1 (B), stage 0 (E)
    on2 = dist2.run(save_runs, root, precision, [("w2s2", 2), ("w2s1", 1), ("w2s0", 0), ("w2s3", 3)])[0]
    meta = tensor_metadata(next(Path(root, "w2s2").glob("global_step*")))
    assert len(meta["optim.state.tok.weight.exp_avg"].chunks) == 2  # each rank wrote its rows
    assert len(meta["model.tok.weight"].chunks) == 1  # replicated: written once
    assert tuple(meta["optim.state.scalar.exp_avg"].size) == ()  # a 0-d parameter's state is saved whole
    meta3 = tensor_metadata(next(Path(root, "w2s3").glob("global_step*")))
    assert len(meta3["model.blocks.0.fc.weight"].chunks) == 2  # stage 3: each rank wrote its rows of the module
    assert tuple(meta3["model.scalar"].size) == ()
    # saved on 1 rank (this process, no process group) at stage 0; 2 -> 1 at stage 2
    on1 = save_runs(root, precision, [("w1s0", 0)])
    loaded_on1 = load_runs(root, precision, [("w2s2", 2)])
    # saved on 4 ranks at stage 2; 2 -> 4 at stage 1
    on4 = dist4.run(save_runs, root, precision, [("w4s2", 2)])[0]
    loaded_on4 = dist4.run(load_runs, root, precision, [("w2s2", 1), ("w2s3", 3)])
    cases = [  # (checkpoint, stage loaded at on 2 ranks, loss tolerance: None = exact)
        ("w2s2", 2, None), ("w2s1", 1, None),  # round trips
        ("w2s2", 1, tol), ("w2s1", 2, tol),  # stage 2 -> 1, 1 -> 2
        ("w2s2", 0, tol), ("w2s0", 2, tol),  # stage 2 -> 0, 0 -> 2
        ("w4s2", 1, tol), ("w1s0", 2, tol),  # 4 -> 2 ranks, 1 -> 2 ranks
        ("w2s3", 3, None), ("w2s1", 3, tol), ("w2s3", 1, tol),  # stage 3 round trip, 1 -> 3, 3 -> 1
        ("w4s2", 3, tol),  # 4 ranks stage 2 -> 2 ranks stage 3
    ]
    loaded_on2 = dist2.run(load_runs, root, precision, [(name, stage) for name, stage, _ in cases])
    saved = {**on2, **on1, **on4}
    for r, per_rank in enumerate(loaded_on2):
        for (name, stage, case_tol), loaded in zip(cases, per_rank):
            _check(saved[name], loaded, case_tol, f"{name} -> 2 ranks stage {stage} (rank {r})")
    _check(saved["w2s2"], loaded_on1[0], tol, "w2s2 -> 1 rank stage 2")
    # export from shards: whole fp32 tensors, read one at a time in this process
    whole = get_fp32_state_dict_from_zero_checkpoint(Path(root, "w2s2"))
    masters = {k[len("master."):]: v for k, v in saved["w2s2"]["state"].items() if k.startswith("master.")}
    assert whole.keys() == {k[len("model."):] for k in saved["w2s2"]["state"] if k.startswith("model.")}
    for name, value in masters.items():
        assert whole[name].dtype == torch.float32 and torch.equal(whole[name], value), name
    single = safetensors.torch.load_file(export_safetensors(Path(root, "w2s2"), Path(root, "out"))[0])
    assert all(torch.equal(single[k], whole[k]) for k in single) and "tok.weight" in single
    for r, per_rank in enumerate(loaded_on4):
        _check(saved["w2s2"], per_rank[0], tol, f"w2s2 -> 4 ranks stage 1 (rank {r})")
        _check(saved["w2s3"], per_rank[1], tol, f"w2s3 -> 4 ranks stage 3 (rank {r})")
    whole3 = get_fp32_state_dict_from_zero_checkpoint(Path(root, "w2s3"))
    for name, value in saved["w2s3"]["state"].items():
        if name.startswith("master."):
            assert torch.equal(whole3[name[len("master."):]], value), name
