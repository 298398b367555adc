"""Monitors from the config: files and calls with the expected rows, rank 0 only, nothing when disabled."""

from __future__ import annotations

import csv
import math
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from monitor_runs import MICRO, STEPS, train_tiny

from deepshard.config import ConfigError, load_config
from deepshard.monitor.csv_monitor import csv_file_name

LOSS_TOL = 1e-12  # the monitor's mean and the test's mean add the same float64 numbers in different orders


def read_csv(path: Path) -> tuple[list[str], list[tuple[int, float]]]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))
    return rows[0], [(int(step), float(value)) for step, value in rows[1:]]


def single(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)


def test_config_keys_and_defaults_are_deepspeeds() -> None:
    cfg = load_config({"train_batch_size": 1})
    assert cfg.csv_monitor.model_dump() == {
        "enabled": False,
        "output_path": "",
        "job_name": "DeepSpeedJobName",
    }
    assert cfg.tensorboard.model_dump() == {
        "enabled": False,
        "output_path": "",
        "job_name": "DeepSpeedJobName",
    }
    assert cfg.wandb.model_dump() == {"enabled": False, "group": None, "team": None, "project": "deepspeed"}
    assert cfg.comet.samples_log_interval == 100 and cfg.comet.mode is None
    with pytest.raises(ConfigError, match="csv_monitor.output_pth"):
        load_config({"train_batch_size": 1, "csv_monitor": {"output_pth": "x"}})


def test_csv_monitor_layout_and_rows(monkeypatch, tmp_path):
    single(monkeypatch, tmp_path)
    out = train_tiny(
        {"csv_monitor": {"enabled": True, "output_path": str(tmp_path / "logs"), "job_name": "job"},
         "wall_clock_breakdown": True}
    )  # fmt: skip
    job = tmp_path / "logs" / "job"
    steps = [MICRO * (i + 1) for i in range(STEPS)]  # step = global samples after each optimizer step
    header, rows = read_csv(job / "Train_Samples_train_loss.csv")
    assert header == ["step", "train_loss"]
    assert [s for s, _ in rows] == steps
    assert all(abs(v - ref) <= LOSS_TOL * ref for (_, v), ref in zip(rows, out["step_means"]))
    header, rows = read_csv(job / "Train_Samples_lr.csv")
    assert header == ["step", "lr"] and rows[-1] == (steps[-1], out["lr"])
    for name in ("grad_norm", "samples_per_sec", "tokens_per_sec", "memory_MiB_rank0", "peak_memory_MiB_rank0",
                 *(f"elapsed_time_ms_{p}" for p in ("forward", "backward", "backward_inner",
                                                    "backward_allreduce", "step"))):  # fmt: skip
        header, rows = read_csv(job / csv_file_name(f"Train/Samples/{name}"))
        assert header == ["step", name] and [s for s, _ in rows] == steps, name
        assert all(math.isfinite(v) and v >= 0 for _, v in rows), name
    _, tok = read_csv(job / "Train_Samples_tokens_per_sec.csv")
    _, smp = read_csv(job / "Train_Samples_samples_per_sec.csv")
    seq = 64  # the tiny preset's sequence length: tokens/s = samples/s * seq exactly
    assert all(abs(t - s * seq) <= 1e-9 * t for (_, t), (_, s) in zip(tok, smp))
    assert not (job / "Train_Samples_loss_scale.csv").exists()  # fp16 only, as in DeepSpeed
    _, peak = read_csv(job / "Train_Samples_peak_memory_MiB_rank0.csv")
    assert peak[-1][1] > 50  # a Python process with torch holds far more than 50 MiB


def test_fp16_writes_loss_scale(monkeypatch, tmp_path):
    single(monkeypatch, tmp_path)
    train_tiny(
        {"csv_monitor": {"enabled": True}, "fp16": {"enabled": True, "initial_scale_power": 8}}, steps=2
    )
    header, rows = read_csv(tmp_path / "DeepSpeedJobName" / "Train_Samples_loss_scale.csv")
    assert header == ["step", "loss_scale"] and rows[0] == (MICRO, 256.0)


def test_nothing_written_when_disabled(monkeypatch, tmp_path):
    single(monkeypatch, tmp_path)
    out = train_tiny({"csv_monitor": {"enabled": False}, "tensorboard": {}, "wall_clock_breakdown": True})
    assert out["cwd_files"] == [] and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("section", "module"), [("tensorboard", "tensorboard"), ("wandb", "wandb"), ("comet", "comet_ml")]
)
def test_absent_package_gives_a_clear_message(monkeypatch, tmp_path, section, module):
    single(monkeypatch, tmp_path)
    monkeypatch.setitem(sys.modules, module, None)  # blocks the import, installed or not
    with pytest.raises(ImportError, match=rf"'{section}.enabled' is true but the Python package '{module}' "
                       rf"is not installed; install it \(pip install 'deepshard\[{section}\]'\)"):  # fmt: skip
        train_tiny({section: {"enabled": True}}, steps=1)


def _fake(name: str, **attrs: Any) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def test_wandb_calls(monkeypatch, tmp_path):
    single(monkeypatch, tmp_path)
    calls: list[tuple[str, Any, Any]] = []
    fake = _fake(
        "wandb",
        init=lambda **kw: calls.append(("init", kw, None)),
        log=lambda data, step=None: calls.append(("log", data, step)),
        finish=lambda: calls.append(("finish", None, None)),
    )
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = train_tiny({"wandb": {"enabled": True, "project": "p", "group": "g", "team": "t"}})
    assert calls[0] == ("init", {"project": "p", "group": "g", "entity": "t"}, None)
    losses = [(data["Train/Samples/train_loss"], step) for kind, data, step in calls if kind == "log"
              and "Train/Samples/train_loss" in data]  # fmt: skip
    assert [s for _, s in losses] == [MICRO * (i + 1) for i in range(STEPS)]
    assert all(abs(v - ref) <= LOSS_TOL * ref for (v, _), ref in zip(losses, out["step_means"]))
    assert all(len(data) == 1 for kind, data, _ in calls if kind == "log")  # one event per call, as DeepSpeed
    assert calls[-1][0] == "finish"


def test_comet_calls_thinned_by_samples_interval(monkeypatch, tmp_path):
    single(monkeypatch, tmp_path)
    logged: list[tuple[str, float, int]] = []
    started: dict[str, Any] = {}

    class Experiment:
        def set_name(self, name: str) -> None:
            started["name"] = name

        def log_metric(self, name: str, value: float, step: int) -> None:
            logged.append((name, value, step))

    def start(**kw: Any) -> Experiment:
        started.update(kw)
        return Experiment()

    monkeypatch.setitem(sys.modules, "comet_ml", _fake("comet_ml", start=start))
    train_tiny({"comet": {"enabled": True, "project": "p", "samples_log_interval": 4, "experiment_name": "e"}},
               steps=3)  # fmt: skip
    assert started["project"] == "p" and started["name"] == "e" and started["mode"] is None
    # steps at samples 2,4,6: logged at the first (2), then once >= 4 more samples passed: 6
    assert [s for n, _, s in logged if n == "Train/Samples/lr"] == [2, 6]


def test_tensorboard_calls(monkeypatch, tmp_path):
    single(monkeypatch, tmp_path)
    scalars: list[tuple[str, float, int]] = []
    made: dict[str, Any] = {}

    class SummaryWriter:
        def __init__(self, log_dir: str) -> None:
            made["log_dir"] = log_dir

        def add_scalar(self, name: str, value: float, step: int) -> None:
            scalars.append((name, value, step))

        def flush(self) -> None:
            made["flushed"] = made.get("flushed", 0) + 1

        def close(self) -> None:
            made["closed"] = True

    monkeypatch.setitem(sys.modules, "tensorboard", _fake("tensorboard"))
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", _fake("torch.utils.tensorboard",
                                                                       SummaryWriter=SummaryWriter))  # fmt: skip
    train_tiny({"tensorboard": {"enabled": True, "output_path": "tb", "job_name": "j"}})
    assert made["log_dir"] == str(Path("tb") / "j") and made["flushed"] == STEPS and made["closed"]
    assert [s for n, _, s in scalars if n == "Train/Samples/lr"] == [MICRO * (i + 1) for i in range(STEPS)]


def test_two_ranks_rank0_writes_memory_of_each_rank(dist2, tmp_path):
    results = dist2.run(train_tiny, {"csv_monitor": {"enabled": True, "output_path": str(tmp_path)}}, 3, 2, 2)
    job = tmp_path / "DeepSpeedJobName"
    _, rows = read_csv(job / "Train_Samples_train_loss.csv")
    ref = results[0]["step_means"]  # mean over both ranks and both micro-batches
    assert [s for s, _ in rows] == [8, 16, 24]
    assert all(abs(v - r) <= LOSS_TOL * r for (_, v), r in zip(rows, ref))
    for rank in (0, 1):
        assert (job / f"Train_Samples_peak_memory_MiB_rank{rank}.csv").exists()
    assert not (job / "Train_Samples_peak_memory_MiB_rank2.csv").exists()
    # only rank 0 wrote: each file holds exactly one header and 3 rows
    with open(job / "Train_Samples_lr.csv") as handle:
        assert len(handle.read().splitlines()) == 4


def test_plot_from_csv_monitor_output(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    from deepshard.launcher.cli import main as cli

    single(monkeypatch, tmp_path)
    train_tiny({"csv_monitor": {"enabled": True, "output_path": "logs"}})
    assert cli(["plot", "logs/DeepSpeedJobName", "--out", "png"]) == 0
    for name in ("loss.png", "throughput.png", "memory.png"):
        assert (tmp_path / "png" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    with pytest.raises(SystemExit, match="no Train_Samples_"):
        cli(["plot", str(tmp_path), "--out", "png"])
