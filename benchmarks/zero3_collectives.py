"""Collectives per ZeRO-3 training step: deepshard vs DeepSpeed, counted in the same model and config.

Each contender trains the benchmark GPT (``--preset small``: 6 blocks) at stage 3 on 2 gloo ranks for
a few steps; every ``torch.distributed`` collective call is counted per step (after two warm-up
steps, so that deepshard's prefetch trace is recorded), and for deepshard also its own
``deepshard.comm`` calls: parameter all-gathers (floats), the 8-byte pre-gather checks (int64) and
gradient reduce-scatters, and its unit gathers whatever their path. ``deepshard`` runs as on one host
(gathers are copies from shared memory, no collective); ``deepshard-collectives`` with
``DEEPSHARD_HOST_SHM=0``, as across hosts, where each gather is one all-gather; deepshard's gloo
all-gather is made of one broadcast per rank, so its ``torch.distributed`` count shows broadcasts.

    python benchmarks/zero3_collectives.py                 # small preset, both contenders
    python benchmarks/zero3_collectives.py --impls deepshard

Prints one JSON line per contender and a table; ``--out`` writes the JSON.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
COUNTED = (
    "all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base", "all_gather_coalesced",
    "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single", "_reduce_scatter_base",
    "all_reduce", "all_reduce_coalesced", "broadcast", "all_to_all_single", "barrier",
)  # fmt: skip


def _worker(impl: str, preset: str, steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    from deepshard.testing.models import GPT, PRESETS

    counts: collections.Counter[str] = collections.Counter()

    def wrap(module: Any, name: str, label: str) -> None:
        original = getattr(module, name, None)
        if original is None:
            return

        def counting(*args: Any, **kwargs: Any) -> Any:
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            kind = "" if tensor is None else ("[int]" if not tensor.is_floating_point() else "")
            counts[f"{label}{name}{kind}"] += 1
            return original(*args, **kwargs)

        setattr(module, name, counting)

    for name in COUNTED:
        wrap(dist, name, "torch.distributed.")
    cfg = PRESETS[preset]
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": 3, "reduce_bucket_size": 5000000, "overlap_comm": True},
    }
    torch.manual_seed(0)
    model = GPT(cfg)
    if impl.startswith("deepshard"):
        import deepshard

        if impl == "deepshard-collectives":  # as across hosts: gathers over gloo collectives
            os.environ["DEEPSHARD_HOST_SHM"] = "0"

        for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "broadcast"):
            wrap(deepshard.comm, name, "deepshard.comm.")
        deepshard.init_distributed()
        engine, *_ = deepshard.initialize(model=model, config=config)
        units = len(engine.partition.stage3.groups)
        runtime = engine.partition.stage3
    else:
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
        engine, *_ = deepspeed.initialize(model=model, config=config, model_parameters=model.parameters())
        units = None
        runtime = None
    world, rank = dist.get_world_size(), dist.get_rank()
    g = torch.Generator().manual_seed(0)
    per_step = []
    for step in range(2 + steps):
        x = torch.randint(0, cfg.vocab_size, (4 * world, cfg.seq_len), generator=g)[rank * 4 : rank * 4 + 4]
        counts.clear()
        before = runtime.gathers if runtime is not None else 0
        loss = engine(x, x)
        engine.backward(loss)
        engine.step()
        if runtime is not None:
            counts["deepshard unit gathers (any path)"] = runtime.gathers - before
        if step >= 2:
            per_step.append(dict(counts))
    if rank == 0:
        result = {
            "impl": impl,
            "preset": preset,
            "parameters": sum(1 for _ in model.parameters()),
            "blocks": cfg.n_layers,
            "units": units,
            "per_step": per_step[-1],
            "steady": all(s == per_step[-1] for s in per_step),
        }
        Path(out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--impls", default="deepshard,deepshard-collectives,deepspeed")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.preset, args.steps, args.result)
        return
    results = []
    for impl in args.impls.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp, "r.json")
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(HERE), "--worker", impl, "--preset", args.preset, "--steps", str(args.steps),
                   "--result", str(result)]  # fmt: skip
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            results.append(json.loads(result.read_text()))
        print(json.dumps(results[-1]))
    print("\n| contender | parameters | units | collective calls in one step |")
    print("|---|---|---|---|")
    for r in results:
        calls = ", ".join(f"{k} {v}" for k, v in sorted(r["per_step"].items()))
        print(f"| {r['impl']} | {r['parameters']} | {r['units'] or '-'} | {calls} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
