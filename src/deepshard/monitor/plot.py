"""``deepshard plot``: PNG charts of a run from the CSV monitor's files (needs `matplotlib`).

    deepshard plot DeepSpeedJobName/ --out plots/

Reads ``<dir>/Train_Samples_*.csv`` (the ``csv_monitor`` layout) and writes ``loss.png`` (train loss),
``throughput.png`` (tokens/s, else samples/s) and ``memory.png`` (peak memory of each rank), each
against the global sample count. A chart whose metric is absent is skipped and says so.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import re

from deepshard.utils.logging import logger

Series = tuple[list[int], list[float]]


def read_metric(path: str) -> Series:
    """``(steps, values)`` of one CSV monitor file (header ``step,<name>``)."""
    steps: list[int] = []
    values: list[float] = []
    with open(path, newline="") as handle:
        rows = csv.reader(handle)
        next(rows, None)
        for step, value in rows:
            steps.append(int(step))
            values.append(float(value))
    return steps, values


def _chart(series: dict[str, Series], ylabel: str, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label)
    ax.set_xlabel("samples")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_run(csv_dir: str, out_dir: str) -> list[str]:
    """Write the charts of the CSV monitor directory ``csv_dir`` into ``out_dir``; returns the PNG paths."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError("deepshard plot needs matplotlib: pip install 'deepshard[plot]'") from error
    if not os.path.isdir(csv_dir):
        raise ValueError(
            f"{csv_dir!r} is not a directory; give the csv_monitor's output_path/job_name directory"
        )
    os.makedirs(out_dir, exist_ok=True)

    def metric(name: str) -> Series | None:
        path = os.path.join(csv_dir, f"Train_Samples_{name}.csv")
        return read_metric(path) if os.path.exists(path) else None

    written: list[str] = []
    loss = metric("train_loss")
    if loss:
        written.append(os.path.join(out_dir, "loss.png"))
        _chart({"train loss": loss}, "loss", "training loss", written[-1])
    speed, label = metric("tokens_per_sec"), "tokens/s"
    if speed is None:
        speed, label = metric("samples_per_sec"), "samples/s"
    if speed:
        written.append(os.path.join(out_dir, "throughput.png"))
        _chart({label: speed}, label, f"throughput ({label})", written[-1])
    memory: dict[str, Series] = {}
    for path in sorted(glob.glob(os.path.join(csv_dir, "Train_Samples_peak_memory_MiB_rank*.csv"))):
        rank = re.search(r"rank(\d+)\.csv$", path)
        if rank:
            memory[f"rank {rank.group(1)}"] = read_metric(path)
    if memory:
        written.append(os.path.join(out_dir, "memory.png"))
        _chart(memory, "peak memory (MiB)", "peak memory per rank", written[-1])
    if not written:
        raise ValueError(f"no Train_Samples_*.csv metric files in {csv_dir!r}; was csv_monitor enabled?")
    return written


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``deepshard plot``."""
    parser = argparse.ArgumentParser(prog="deepshard plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("csv_dir", help="the csv_monitor directory (output_path/job_name)")
    parser.add_argument("--out", default="plots", help="directory for the PNG files")
    args = parser.parse_args(argv)
    try:
        paths = plot_run(args.csv_dir, args.out)
    except (ValueError, ImportError) as error:
        raise SystemExit(f"deepshard plot: {error}") from error
    for path in paths:
        logger.info("wrote %s", path)
    return 0
