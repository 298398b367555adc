"""The autotuner on the tiny GPT: it finishes, writes the table, and its pick runs."""

from __future__ import annotations

import json
import textwrap

import pytest

from deepshard.autotuning.tuner import search_space, split_argv
from deepshard.launcher.cli import main as cli

SCRIPT = textwrap.dedent(
    """
    import argparse, json, sys
    import torch, deepshard
    from deepshard.testing.models import GPT, PRESETS
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser.add_argument("--steps", type=int, default=4)
    deepshard.add_config_arguments(parser)
    args = parser.parse_args()
    deepshard.init_distributed()
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    engine, *_ = deepshard.initialize(args=args, model=GPT(cfg))
    mbs = engine.train_micro_batch_size_per_gpu()
    while engine.global_steps < args.steps:
        x = torch.randint(0, cfg.vocab_size, (mbs, cfg.seq_len))
        engine.backward(engine(x, x))
        engine.step()
    with open("finished.json", "w") as handle:
        json.dump({"micro_batch": mbs, "stage": engine.zero_optimization_stage()}, handle)
    """
)


def test_argv_and_search_space() -> None:
    assert split_argv(["--autotuning", "run", "--num_procs", "2", "t.py"]) == (
        "run",
        ["--num_procs", "2", "t.py"],
    )
    with pytest.raises(ValueError, match="--autotuning takes 'tune' or 'run'"):
        split_argv(["--autotuning=go", "t.py"])
    raw = {
        "autotuning": {
            "enabled": True,
            "num_tuning_micro_batch_sizes": 2,
            "min_train_micro_batch_size_per_gpu": 2,
        }
    }
    assert search_space(raw) == [(s, m) for s in (0, 1, 2, 3) for m in (2, 4)]
    assert search_space({**raw, "zero_optimization": {"stage": 1}}) == [(1, 2), (1, 4)]


@pytest.mark.slow  # three launcher runs (two experiments and the pick): ~40 s on an idle 2-core machine
def test_tune_then_run_tiny_gpt(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / "train.py").write_text(SCRIPT)
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "zero_optimization": {"stage": 1},
        "autotuning": {"enabled": True, "start_profile_step": 1, "end_profile_step": 2,
                       "num_tuning_micro_batch_sizes": 2},
    }  # fmt: skip
    (tmp_path / "ds.json").write_text(json.dumps(config))
    argv = ["--autotuning", "run", "--num_procs", "1", "--master_port", "29741", "train.py",
            "--deepspeed_config", "ds.json"]  # fmt: skip
    assert cli(argv) == 0
    results = json.loads((tmp_path / "autotuning_results" / "results.json").read_text())
    assert [e["name"] for e in results["experiments"]] == ["z1_mbs1", "z1_mbs2"]
    assert all(e["status"] == "ok" and e["throughput"] > 0 for e in results["experiments"])
    best = max(results["experiments"], key=lambda e: e["throughput"])
    assert results["best"] == best["name"]
    optimal = json.loads((tmp_path / "autotuning_results" / "ds_config_optimal.json").read_text())
    assert optimal["train_micro_batch_size_per_gpu"] == best["micro_batch"]
    assert "| z1_mbs1" in (tmp_path / "autotuning_results" / "summary.md").read_text()
    # 'run' trained to the end with the pick (experiments stop after end_profile_step and write no file)
    assert json.loads((tmp_path / "finished.json").read_text()) == {
        "micro_batch": best["micro_batch"],
        "stage": 1,
    }
