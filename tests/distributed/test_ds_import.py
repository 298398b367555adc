"""Importing DeepSpeed ZeRO-1/2/3 checkpoints written by real DeepSpeed (``tests/fixtures/deepspeed``).

Each fixture was saved by DeepSpeed 0.19.8 on 2 gloo ranks after 3 steps (see its README); its
``reference.json`` holds DeepSpeed's per-parameter sums and norms of the fp32 master and the Adam
moments at the save, and the losses of DeepSpeed's next 3 steps. deepshard must reproduce the former
exactly and the latter up to float reordering, at any world size and ZeRO stage, without DeepSpeed.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

import deepshard
from deepshard.checkpoint import CorruptCheckpointError, get_fp32_state_dict_from_zero_checkpoint
from deepshard.checkpoint.convert import main as convert_main
from deepshard.checkpoint.deepspeed_import import read_deepspeed_checkpoint
from deepshard.testing.models import GPT, GPTConfig
from deepshard.testing.parity import make_token_batches, max_relative_difference, train_engine
from deepshard.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "deepspeed"
VARIANTS = sorted(p.name for p in FIXTURES.iterdir() if (p / "reference.json").is_file())
# fp32: only the reduction order differs from DeepSpeed's. bf16: DeepSpeed and deepshard round the
# bf16 forward/backward and gradient reduction differently (measured <= 1.6e-5; fp32 <= 1.7e-7).
TOL = {False: 1e-5, True: 1e-4}


def reference(variant: str) -> dict[str, Any]:
    return json.loads((FIXTURES / variant / "reference.json").read_text())


def _world() -> int:
    return deepshard.comm.get_world_size() if torch.distributed.is_initialized() else 1


def _engine(ref: dict[str, Any], stage: int) -> Any:
    torch.manual_seed(1)  # not DeepSpeed's initial weights: the load must overwrite them
    model = GPT(GPTConfig(**ref["model"]))
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": ref["data"]["global_batch"] // _world(),
        # the fixture's client optimizer: torch.optim.AdamW(lr=1e-3, weight_decay=0.01), single-tensor step
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": 1e-3, "weight_decay": 0.01, "foreach": False, "fused": False},
        },
        "scheduler": ref["config"]["scheduler"],
        "zero_optimization": {"stage": stage},
        "gradient_clipping": 0.0,
    }
    if stage == 3:  # shard the small test model's parameters too (DeepSpeed's threshold keeps them whole)
        cfg["zero_optimization"]["stage3_param_persistence_threshold"] = 1000
    if ref["bf16"]:
        cfg["bf16"] = {"enabled": True}
    engine, _, _, _ = deepshard.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    return engine


def _summary(engine: Any) -> dict[str, dict[str, list[float]]]:
    """Collective: sum and norm (float64) of each parameter's whole master and Adam moments."""
    out = {}
    for name, p in engine.module.named_parameters():
        values = {
            "fp32": safe_get_full_fp32_param(p),
            "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
            "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq"),
        }
        out[name] = {k: [float(v.double().sum()), float(v.double().norm())] for k, v in values.items()}
    return out


def resume_runs(plans: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """For each ``(variant, stage)``: load the DeepSpeed fixture into a fresh engine, record its state, train on."""
    out = []
    for variant, stage in plans:
        ref = reference(variant)
        engine = _engine(ref, stage)
        path, client = engine.load_checkpoint(str(FIXTURES / variant))
        assert path is not None and client == {}
        record: dict[str, Any] = {
            "steps": engine.global_steps,
            "samples": engine.global_samples,
            "lr": engine.get_lr()[0],
            "summary": _summary(engine),
        }
        model = ref["model"]
        batches = make_token_batches(
            model["vocab_size"],
            model["seq_len"],
            ref["data"]["global_batch"],
            ref["data"]["count"],
            seed=ref["data"]["seed"],
        )[ref["global_steps"] :]
        record["losses"] = train_engine(engine, batches)
        out.append(record)
    return out


def _check(variant: str, got: dict[str, Any], label: str) -> float:
    """Assert the resumed run matches DeepSpeed's; return the largest relative loss difference."""
    ref = reference(variant)
    assert got["steps"] == ref["global_steps"] == 3 and got["samples"] == 12, label
    assert got["lr"] == pytest.approx(ref["lr_at_save"], rel=1e-12), label
    assert got["summary"].keys() == ref["params"].keys(), label
    for name, entry in ref["params"].items():
        for key, (total, norm) in entry.items():
            mine = got["summary"][name][key]
            assert mine[0] == pytest.approx(total, rel=1e-9, abs=1e-12), f"{label}: {key} of {name}"
            assert mine[1] == pytest.approx(norm, rel=1e-9, abs=1e-12), f"{label}: {key} of {name}"
    diff = max_relative_difference(got["losses"], ref["losses"])
    assert diff <= TOL[ref["bf16"]], (
        f"{label}: losses {got['losses']} vs DeepSpeed's {ref['losses']} ({diff:.2e})"
    )
    return diff


def test_fixtures_present():
    assert {"zero1_fp32", "zero2_fp32", "zero3_fp32", "zero2_bf16"} <= set(VARIANTS)
    size = sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file())
    assert size < 10 * 2**20


@pytest.mark.parametrize("variant", VARIANTS)
def test_read_matches_deepspeed(variant, monkeypatch):
    """Whole tensors out of the rank partitions equal DeepSpeed's own view, with DeepSpeed not importable."""
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # any `import deepspeed` now fails
    ref = reference(variant)
    state = read_deepspeed_checkpoint(FIXTURES / variant / "global_step3")
    assert state.zero_stage == ref["zero_stage"] and state.world_size == 2
    assert state.aliases == {"head.weight": "tok.weight"} and set(state.trainable) == set(ref["params"])
    for name, entry in ref["params"].items():
        values = {"fp32": state.weights[name], **state.optimizer[name]}
        for key, (total, norm) in entry.items():
            v = values[key].double()
            assert values[key].dtype == torch.float32 and v.shape == state.weights[name].shape
            assert float(v.sum()) == pytest.approx(total, rel=1e-12, abs=1e-15), f"{key} of {name}"
            assert float(v.norm()) == pytest.approx(norm, rel=1e-12, abs=1e-15), f"{key} of {name}"
    assert [float(g.scalars["step"]) for g in state.groups] == [3.0]
    assert state.groups[0].hyper["lr"] == ref["lr_at_save"]
    assert state.lr_scheduler == {"last_batch_iteration": 2}


def test_resume_on_one_rank():
    plans = [("zero2_fp32", 0), ("zero3_fp32", 2), ("zero1_odd_bf16", 1)]
    for (variant, stage), got in zip(plans, resume_runs(plans)):
        _check(variant, got, f"{variant} -> 1 rank stage {stage}")


WORLD2 = [
    ("zero1_fp32", 1),
    ("zero2_fp32", 2),
    ("zero3_fp32", 2),
    ("zero3_fp32", 0),
    ("zero2_fp32", 1),
    ("zero2_bf16", 2),
    ("zero2_odd_fp32", 2),
    ("zero1_odd_bf16", 1),
    ("zero3_odd_fp32", 1),
    ("zero3_fp32", 3),
    ("zero3_odd_fp32", 3),
    ("zero2_bf16", 3),
]


def test_resume_on_two_ranks(dist2):
    results = dist2.run(resume_runs, WORLD2)
    for r, per_rank in enumerate(results):
        for (variant, stage), got in zip(WORLD2, per_rank):
            _check(variant, got, f"{variant} -> 2 ranks stage {stage} (rank {r})")


def test_resume_on_four_ranks(dist4):
    plans = [("zero3_fp32", 1), ("zero2_odd_fp32", 2)]
    for r, per_rank in enumerate(dist4.run(resume_runs, plans)):
        for (variant, stage), got in zip(plans, per_rank):
            _check(variant, got, f"{variant} -> 4 ranks stage {stage} (rank {r})")


@pytest.mark.parametrize("variant", ["zero2_fp32", "zero3_odd_fp32", "zero2_bf16"])
def test_convert(variant, tmp_path, capsys):
    state = read_deepspeed_checkpoint(FIXTURES / variant / "global_step3", optimizer_states=False)
    assert convert_main([str(FIXTURES / variant), str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip().endswith("model.safetensors")
    exported = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    assert exported.keys() == set(state.trainable)  # the tied head.weight once, as tok.weight
    for name, value in exported.items():
        assert value.dtype == torch.float32 and torch.equal(value, state.weights[name]), name
    whole = get_fp32_state_dict_from_zero_checkpoint(FIXTURES / variant / "global_step3")
    assert whole["head.weight"] is whole["tok.weight"] and torch.equal(
        whole["tok.weight"], exported["tok.weight"]
    )


def _broken_copy(tmp_path: Path, variant: str, victim: str, keep: float) -> tuple[Path, Path]:
    root = tmp_path / variant
    shutil.copytree(FIXTURES / variant, root)
    path = root / "global_step3" / victim
    data = path.read_bytes()
    if keep == 0:
        path.unlink()
    else:
        path.write_bytes(data[: int(len(data) * keep)])
    return root, path


@pytest.mark.parametrize(
    "victim", ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"]
)
def test_truncated_file_is_named(victim, tmp_path, capsys):
    root, path = _broken_copy(tmp_path, "zero2_fp32", victim, keep=0.5)
    engine = _engine(reference("zero2_fp32"), 0)
    with pytest.raises(CorruptCheckpointError, match=str(path)):
        engine.load_checkpoint(str(root))
    assert convert_main([str(root), str(tmp_path / "out")]) == 1
    assert str(path) in capsys.readouterr().err


def test_missing_rank_file_is_named(tmp_path):
    root, _ = _broken_copy(tmp_path, "zero3_fp32", "zero_pp_rank_1_mp_rank_00_optim_states.pt", keep=0)
    with pytest.raises(CorruptCheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt"):
        read_deepspeed_checkpoint(root / "global_step3")
