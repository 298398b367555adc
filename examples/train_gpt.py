"""Train a small GPT on byte-level text from Python's standard library with deepshard.

    deepshard --num_procs 2 examples/train_gpt.py --deepspeed_config examples/configs/zero0_fp32.json

Rank 0 shows a progress bar with the loss and tokens/s; the run ends with the memory held by each
rank, a checkpoint in --save_dir, and a one-line summary. ``--loss_log FILE`` writes the per-step
losses as JSON (used to compare runs on different topologies).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tqdm import tqdm

import deepshard
from deepshard.accelerator import peak_rss_bytes
from deepshard.testing.data import ByteTextDataset, default_text_bytes, stdlib_text
from deepshard.testing.models import GPT, PRESETS, num_parameters

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small-bytes", choices=sorted(PRESETS), help="model size")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps to run")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--save_dir", default="checkpoints/train_gpt", help="where the checkpoint goes")
    parser.add_argument("--loss_log", default=None, help="write per-step mean losses as JSON here (rank 0)")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")
    deepshard.add_config_arguments(parser)
    args = parser.parse_args()
    if args.deepspeed_config is None:
        args.deepspeed_config = os.path.join(HERE, "configs", "zero0_fp32.json")
    return args


def main() -> None:
    args = parse_args()
    deepshard.init_distributed()
    rank, world = deepshard.comm.get_rank(), deepshard.comm.get_world_size()

    torch.manual_seed(args.seed)
    cfg = PRESETS[args.preset]
    model = GPT(cfg)
    dataset = ByteTextDataset(stdlib_text(default_text_bytes()), cfg.seq_len)
    engine, _, loader, _ = deepshard.initialize(
        args=args, model=model, model_parameters=model.parameters(), training_data=dataset
    )
    assert loader is not None

    tokens_per_step = engine.train_batch_size() * cfg.seq_len
    losses: list[float] = []
    batches = iter(loader)
    bar = tqdm(total=args.steps, disable=rank != 0, desc=f"train {args.preset} x{world}", unit="step", mininterval=1.0)
    start = time.perf_counter()
    micro_loss, micro_count = torch.zeros(()), 0
    while engine.global_steps < args.steps:
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        boundary = engine.is_gradient_accumulation_boundary()
        loss = engine(x.to(engine.device), y.to(engine.device))
        engine.backward(loss)
        engine.step()
        micro_loss += loss.detach().float().cpu()
        micro_count += 1
        if boundary:  # one optimizer step done: log the mean loss over micro-batches and ranks
            mean = micro_loss / micro_count
            deepshard.comm.all_reduce(mean)
            losses.append(float(mean) / world)
            micro_loss, micro_count = torch.zeros(()), 0
            elapsed = time.perf_counter() - start
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{engine.global_steps * tokens_per_step / elapsed:,.0f}")
            bar.update(1)
    bar.close()
    elapsed = time.perf_counter() - start

    # memory per rank, gathered to rank 0
    mem = engine.memory_breakdown()
    offloaded = sum(sum(tier.values()) for tier in mem.tiers.values())  # host RAM + NVMe (offload configs)
    row = torch.tensor(
        [mem.parameters, mem.gradients, mem.master_weights, mem.optimizer_states, offloaded, peak_rss_bytes()],
        dtype=torch.float64,
    )
    rows = [torch.zeros_like(row) for _ in range(world)]
    deepshard.comm.all_gather(rows, row)
    path = engine.save_checkpoint(args.save_dir)
    if rank == 0:
        mib = 2**20
        print(f"\nmodel: {num_parameters(model):,} parameters | world {world} | ZeRO stage {engine.zero_optimization_stage()}")
        print(f"{'rank':>4} {'params':>10} {'grads':>10} {'master':>10} {'optim':>10} {'offloaded':>10} {'peak RSS':>10}  (MiB)")
        for r, vals in enumerate(rows):
            print(f"{r:>4} " + " ".join(f"{v / mib:>10.1f}" for v in vals.tolist()))
        print(
            f"summary: {args.steps} steps in {elapsed:.1f}s, {args.steps * tokens_per_step / elapsed:,.0f} tokens/s, "
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f}, checkpoint {path}"
        )
        if args.loss_log:
            with open(args.loss_log, "w") as fh:
                json.dump({"world_size": world, "losses": losses}, fh)


if __name__ == "__main__":
    main()
