"""Predicted (``deepshard estimate``) vs measured peak RSS per rank of the example GPT, ZeRO stages 0-3.

For each stage, trains ``examples/train_gpt.py`` on 2 gloo ranks (the README's launcher) for a few
steps with ``examples/configs/zero2_fp32.json`` at that stage (scheduler dropped), reads each rank's
peak RSS from the example's final table, and compares it with ``deepshard estimate`` for the same
model, world size, micro-batch and config. Prints a Markdown table.

    python benchmarks/estimate_vs_measured.py --preset small --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MiB = 2**20


def measured(preset: str, steps: int, config: str, workdir: str) -> list[float]:
    cmd = [sys.executable, "-m", "deepshard.launcher", "--num_procs", "2", os.path.join(ROOT, "examples", "train_gpt.py"),
           "--preset", preset, "--steps", str(steps), "--save_dir", os.path.join(workdir, "ck"),
           "--deepspeed_config", config]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = re.findall(r"^(?:\[rank0\]:)?\s+(\d)\s+(?:[\d.]+\s+){5}([\d.]+)\s*$", out, flags=re.M)
    if len(rows) != 2:
        raise RuntimeError(f"could not read the peak RSS table from the example's output:\n{out[-3000:]}")
    return [float(v) for _, v in sorted(rows)]


def estimated(preset: str, config: str) -> dict[str, float]:
    cmd = [sys.executable, "-m", "deepshard.launcher", "estimate", "--preset", preset, "--world_size", "2",
           "--deepspeed_config", config, "--json"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("[") :])[0]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--stages", default="0,1,2,3")
    args = parser.parse_args()
    with open(os.path.join(ROOT, "examples", "configs", "zero2_fp32.json")) as handle:
        base = json.load(handle)
    base.pop("scheduler", None)
    print("| stage | estimate (MiB) | of which activations+temp | measured rank 0 / rank 1 (MiB) | error |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as workdir:
        for stage in (int(s) for s in args.stages.split(",")):
            config = os.path.join(workdir, f"z{stage}.json")
            with open(config, "w") as handle:
                json.dump({**base, "zero_optimization": {"stage": stage}}, handle)
            est = estimated(args.preset, config)
            peaks = measured(args.preset, args.steps, config, workdir)
            total = est["total"] / MiB
            errors = [(total - p) / p for p in peaks]
            worst = max(errors, key=abs)
            print(f"| {stage} | {total:.0f} | {(est['activations'] + est['temporaries']) / MiB:.0f} | "
                  f"{peaks[0]:.0f} / {peaks[1]:.0f} | {worst * 100:+.1f} % |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
