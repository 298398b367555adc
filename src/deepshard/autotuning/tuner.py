"""``deepshard --autotuning {tune,run} [launcher flags] script.py ... --deepspeed_config ds.json``.

A grid search over ZeRO stage x micro-batch, each point a short run of the user's script through
the launcher (:mod:`deepshard.autotuning.experiment` times steps ``start_profile_step`` to
``end_profile_step`` and stops the run):

* stages: the config's ``zero_optimization.stage`` when it sets one, else 0, 1, 2 and 3;
* micro-batches: ``min_train_micro_batch_size_per_gpu`` doubling, ``num_tuning_micro_batch_sizes`` of them,
  at most ``max_train_micro_batch_size_per_gpu``; the first failing size (out of memory, or any error)
  ends that stage's search (early stop), as do ``tuner_early_stopping`` sizes without improvement;
* at most ``tuner_num_trials`` experiments.

Each experiment's config and metrics go to ``exps_dir/<name>/``; ``results_dir`` gets ``results.json``,
``summary.md`` (the table) and ``ds_config_optimal.json`` (the best by ``metric``). ``run`` then
launches the script once more with the best config.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

from deepshard.autotuning.experiment import METRIC_PATH_ENV
from deepshard.config import load_config
from deepshard.utils.logging import logger

_CONFIG_FLAGS = ("--deepspeed_config", "--deepspeed")


@dataclass
class Experiment:
    """One point of the search and what it measured (``None`` when it failed)."""

    name: str
    stage: int
    micro_batch: int
    throughput: float | None = None
    latency: float | None = None
    status: str = "not run"


def split_argv(argv: list[str]) -> tuple[str, list[str]]:
    """``("tune" | "run", argv without --autotuning)``."""
    out: list[str] = []
    mode = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--autotuning" and mode is None:
            mode = argv[i + 1] if i + 1 < len(argv) else ""
            i += 2
            continue
        if arg.startswith("--autotuning=") and mode is None:
            mode = arg.split("=", 1)[1]
        else:
            out.append(arg)
        i += 1
    if mode not in ("tune", "run"):
        raise ValueError(f"--autotuning takes 'tune' or 'run', got {mode!r}")
    return mode, out


def _config_index(argv: list[str]) -> int:
    for i, arg in enumerate(argv):
        if arg in _CONFIG_FLAGS and i + 1 < len(argv):
            return i + 1
    raise ValueError("--autotuning needs the script's --deepspeed_config ds.json (or --deepspeed ds.json)")


def search_space(raw: dict[str, Any]) -> list[tuple[int, int]]:
    """``(stage, micro_batch)`` points in the order they are tried (see the module doc)."""
    tuning = load_config({**raw, "train_batch_size": 1, "train_micro_batch_size_per_gpu": 1,
                          "gradient_accumulation_steps": 1}).autotuning  # fmt: skip
    zero = raw.get("zero_optimization", {})
    stages = [int(zero["stage"])] if "stage" in zero else [0, 1, 2, 3]
    sizes: list[int] = []
    size = tuning.min_train_micro_batch_size_per_gpu
    while (
        len(sizes) < tuning.num_tuning_micro_batch_sizes and size <= tuning.max_train_micro_batch_size_per_gpu
    ):
        sizes.append(size)
        size *= 2
    return [(stage, mbs) for stage in stages for mbs in sizes]


def _experiment_config(raw: dict[str, Any], stage: int, micro_batch: int) -> dict[str, Any]:
    cfg = copy.deepcopy(raw)
    cfg.pop("train_batch_size", None)
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg.setdefault("gradient_accumulation_steps", 1)
    cfg.setdefault("zero_optimization", {})["stage"] = stage
    return cfg


def _launch(argv: list[str], env: dict[str, str] | None = None) -> int:
    command = [sys.executable, "-m", "deepshard.launcher", *argv]
    return subprocess.run(command, env={**os.environ, **(env or {})}, check=False).returncode


def tune(argv: list[str]) -> tuple[Experiment | None, list[Experiment], dict[str, Any]]:
    """Run the search; returns the best experiment, all experiments, and the best config."""
    at = _config_index(argv)
    with open(argv[at]) as handle:
        raw = json.load(handle)
    tuning = load_config({**raw, "train_batch_size": 1, "train_micro_batch_size_per_gpu": 1,
                          "gradient_accumulation_steps": 1}).autotuning  # fmt: skip
    if not tuning.enabled:
        raise ValueError('--autotuning needs "autotuning": {"enabled": true} in the config')
    better = (lambda a, b: a > b) if tuning.metric == "throughput" else (lambda a, b: a < b)
    experiments: list[Experiment] = []
    stopped: set[int] = set()
    since_best: dict[int, int] = {}
    best: Experiment | None = None
    for stage, mbs in search_space(raw):
        if stage in stopped or len(experiments) >= tuning.tuner_num_trials:
            continue
        exp = Experiment(f"z{stage}_mbs{mbs}", stage, mbs)
        experiments.append(exp)
        folder = os.path.join(tuning.exps_dir, exp.name)
        os.makedirs(folder, exist_ok=True)
        config_path, metrics_path = (
            os.path.join(folder, "ds_config.json"),
            os.path.join(folder, "metrics.json"),
        )
        with open(config_path, "w") as handle:
            json.dump(_experiment_config(raw, stage, mbs), handle, indent=2)
        if tuning.overwrite or not os.path.exists(metrics_path):
            if os.path.exists(metrics_path):
                os.remove(metrics_path)
            exp_argv = list(argv)
            exp_argv[at] = config_path
            logger.info("autotuning: running %s", exp.name)
            _launch(exp_argv, {METRIC_PATH_ENV: os.path.abspath(metrics_path)})
        if not os.path.exists(metrics_path):
            exp.status = "failed (out of memory or an error): larger micro-batches of this stage skipped"
            stopped.add(stage)
            continue
        with open(metrics_path) as handle:
            metrics = json.load(handle)
        exp.throughput, exp.latency, exp.status = metrics["throughput"], metrics["latency"], "ok"
        value = metrics[tuning.metric]
        if best is None or better(value, getattr(best, tuning.metric)):
            best, since_best[stage] = exp, 0
        else:
            since_best[stage] = since_best.get(stage, 0) + 1
            if since_best[stage] >= tuning.tuner_early_stopping:
                stopped.add(stage)
    optimal = _experiment_config(raw, best.stage, best.micro_batch) if best is not None else {}
    _write_results(tuning.results_dir, experiments, best, optimal, tuning.metric)
    return best, experiments, optimal


def summary_table(experiments: list[Experiment], best: Experiment | None) -> str:
    """The results as a Markdown table."""
    lines = [
        "| experiment | stage | micro-batch | samples/s | s/step | status |",
        "|---|---|---|---|---|---|",
    ]
    for e in experiments:
        mark = " (best)" if best is not None and e.name == best.name else ""
        tput = f"{e.throughput:.2f}" if e.throughput is not None else "-"
        lat = f"{e.latency:.3f}" if e.latency is not None else "-"
        lines.append(f"| {e.name}{mark} | {e.stage} | {e.micro_batch} | {tput} | {lat} | {e.status} |")
    return "\n".join(lines)


def _write_results(
    folder: str, experiments: list[Experiment], best: Experiment | None, optimal: dict[str, Any], metric: str
) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w") as handle:
        json.dump({"metric": metric, "best": best.name if best else None,
                   "experiments": [asdict(e) for e in experiments]}, handle, indent=2)  # fmt: skip
    table = summary_table(experiments, best)
    with open(os.path.join(folder, "summary.md"), "w") as handle:
        handle.write(table + "\n")
    if best is not None:
        with open(os.path.join(folder, "ds_config_optimal.json"), "w") as handle:
            json.dump(optimal, handle, indent=2)
    logger.info("autotuning results (%s):\n%s", metric, table)


def main(argv: list[str]) -> int:
    """Entry point for ``deepshard --autotuning ...``."""
    try:
        mode, rest = split_argv(argv)
        best, _, optimal = tune(rest)
    except ValueError as error:
        raise SystemExit(f"deepshard --autotuning: {error}") from error
    if best is None:
        logger.error("autotuning: no experiment ran to the end; see the table for each one's status")
        return 1
    if mode == "tune":
        return 0
    at = _config_index(rest)
    rest[at] = os.path.join(load_config(optimal).autotuning.results_dir, "ds_config_optimal.json")
    logger.info("autotuning: launching with the best config %s", rest[at])
    return _launch(rest)
