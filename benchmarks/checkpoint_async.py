"""Training time lost to checkpoint saves, asynchronous vs synchronous, against a run without saves.

Trains the benchmark GPT (``PRESETS["small"]``, ~23M parameters, fp32 + AdamW: 276 MiB per
checkpoint) in this process (one rank, ZeRO stage as given) for ``--steps`` optimizer steps, saving
every ``--every`` steps. The three modes (no save, ``async_save=False``, ``async_save=True``)
alternate within each round, so that the machine's drift hits all of them alike; a fresh engine and
an empty directory are used per run. Each run's time includes waiting for the last asynchronous
write. Reported: the median over rounds of (run - no-save run) / number of saves, per mode.

    python benchmarks/checkpoint_async.py                       # 3 rounds, 20 steps, a save every 5
    python benchmarks/checkpoint_async.py --rounds 5 --stage 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import deepshard
from deepshard.testing.models import GPT, PRESETS
from deepshard.testing.parity import make_token_batches

MODES = ("none", "sync", "async")


def run(mode: str, steps: int, every: int, stage: int, work: Path) -> float:
    """Seconds for ``steps`` steps with a save every ``every`` steps in ``mode``."""
    cfg = PRESETS["small"]
    torch.manual_seed(0)
    model = GPT(cfg)
    engine, _, _, _ = deepshard.initialize(
        model=model, model_parameters=model.parameters(),
        config={"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": stage},
                "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}},
    )
    batches = make_token_batches(cfg.vocab_size, cfg.seq_len, 4, steps + 1, seed=0)
    loss = engine(*batches[-1])  # warm-up step: allocates the optimizer state
    engine.backward(loss)
    engine.step()
    save_dir = work / mode
    start = time.perf_counter()
    for i, (x, y) in enumerate(batches[:steps], start=1):
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        if mode != "none" and i % every == 0:
            engine.save_checkpoint(str(save_dir), async_save=mode == "async")
    engine.wait_for_checkpoint()
    elapsed = time.perf_counter() - start
    shutil.rmtree(save_dir, ignore_errors=True)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--stage", type=int, default=0)
    args = parser.parse_args()
    saves = args.steps // args.every
    work = Path(tempfile.mkdtemp(prefix="checkpoint_async_"))
    times: dict[str, list[float]] = {m: [] for m in MODES}
    try:
        for r in range(args.rounds):
            order = MODES[r % 3:] + MODES[: r % 3]  # rotate which mode runs first
            for mode in order:
                times[mode].append(run(mode, args.steps, args.every, args.stage, work))
            print(f"round {r + 1}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in MODES), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(times["none"])
    print(f"{args.steps} steps, a save every {args.every} ({saves} saves), stage {args.stage}, "
          f"median no-save run {base:.2f}s ({base / args.steps * 1000:.0f} ms/step)")
    for mode in ("sync", "async"):
        lost = [(t - n) / saves for t, n in zip(times[mode], times["none"])]
        print(f"{mode:>5}: median time lost per save {statistics.median(lost):.3f}s "
              f"(per round: {', '.join(f'{x:.3f}' for x in lost)})")


if __name__ == "__main__":
    main()
