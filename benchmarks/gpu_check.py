"""GPU figures for a lent CUDA machine, in one process: transfers, stream overlap, engine throughput.

    python benchmarks/gpu_check.py --out gpu_check.json

1. Host↔device bandwidth, pinned vs pageable, through ``get_accelerator().pin_memory`` (256 MiB).
2. Stream overlap: a host→device copy on a side stream from ``new_stream()`` concurrent with matrix
   products on the default stream, against the two run one after the other.
3. Training throughput of the medium GPT (GPT-2-small shape) on one GPU: deepshard stages 0–2 (one-rank
   NCCL group) in bf16 and fp32, against a plain PyTorch loop (fused AdamW; bf16 = autocast with fp32
   weights, the stock recipe), alternating, median of rounds.

Prints a table and writes the figures as JSON. Needs CUDA; it exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import time
from typing import Any

import torch


def _bandwidth(size_mib: int = 256, reps: int = 5) -> dict[str, float]:
    from deepshard.accelerator import get_accelerator

    acc = get_accelerator()
    n = size_mib * (1 << 20) // 4
    pageable = torch.ones(n)
    pinned = acc.pin_memory(torch.ones(n))
    dev = torch.empty(n, device="cuda")
    out: dict[str, float] = {}
    for name, host in (("pageable", pageable), ("pinned", pinned)):
        for direction in ("h2d", "d2h"):
            times = []
            for _ in range(reps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                if direction == "h2d":
                    dev.copy_(host, non_blocking=True)
                else:
                    host.copy_(dev, non_blocking=True)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            out[f"{name}_{direction}_GBps"] = size_mib * (1 << 20) / min(times) / 1e9
    return out


def _overlap() -> dict[str, float]:
    from deepshard.accelerator import get_accelerator

    acc = get_accelerator()
    side = acc.new_stream()
    host = acc.pin_memory(torch.ones(128 * (1 << 20) // 4))
    dev = torch.empty_like(host, device="cuda")
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)

    def compute() -> None:
        for _ in range(40):
            a @ a

    def copy() -> None:
        for _ in range(4):
            dev.copy_(host, non_blocking=True)

    def timed(fn: Any) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(compute), timed(copy)
    t_compute, t_copy = timed(compute), timed(copy)

    def both() -> None:
        with acc.stream(side):
            copy()
        compute()

    timed(both)
    t_both = timed(both)
    return {"compute_ms": t_compute * 1e3, "copy_ms": t_copy * 1e3, "overlapped_ms": t_both * 1e3,
            "serial_ms": (t_compute + t_copy) * 1e3}  # fmt: skip


def _run(contender: str, dtype: str, steps: int, warmup: int, micro: int) -> float:
    """Tokens/s of one contender (one GPU)."""
    import deepshard
    from deepshard.testing.models import GPT, PRESETS
    from deepshard.testing.parity import make_token_batches

    cfg = PRESETS["medium"]
    torch.manual_seed(0)
    model = GPT(cfg)
    batches = [
        (x.cuda(), y.cuda()) for x, y in make_token_batches(cfg.vocab_size, cfg.seq_len, micro, 4, seed=1)
    ]
    if contender == "torch":
        model = model.cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=True)

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        stage = int(contender.rsplit("-", 1)[1])
        ds: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": micro,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage},
        }
        if dtype == "bf16":
            ds["bf16"] = {"enabled": True}
        engine, _, _, _ = deepshard.initialize(model=model, config=ds)

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()

    for i in range(warmup):
        step(*batches[i % len(batches)])
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(*batches[i % len(batches)])
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    return steps * micro * cfg.seq_len / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--micro", type=int, default=16)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run it on a GPU machine", file=sys.stderr)
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})  # fmt: skip
    import deepshard

    deepshard.init_distributed()
    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "nccl": ".".join(map(str, torch.cuda.nccl.version())),
                              "backend": torch.distributed.get_backend()}  # fmt: skip
    report["bandwidth"] = _bandwidth()
    print("bandwidth GB/s:", json.dumps(report["bandwidth"]), flush=True)
    report["overlap"] = _overlap()
    print("stream overlap:", json.dumps(report["overlap"]), flush=True)
    contenders = ["torch", "deepshard-0", "deepshard-1", "deepshard-2"]
    tps: dict[str, list[float]] = {}
    for dtype in ("bf16", "fp32"):
        for r in range(args.rounds):
            order = contenders if r % 2 == 0 else contenders[::-1]
            for c in order:
                v = _run(c, dtype, args.steps, warmup=5, micro=args.micro)
                tps.setdefault(f"{dtype}/{c}", []).append(v)
                print(f"round {r} {dtype} {c}: {v:,.0f} tokens/s", flush=True)
                gc.collect()
                torch.cuda.empty_cache()
    report["tokens_per_s"] = {k: statistics.median(v) for k, v in tps.items()}
    report["tokens_per_s_rounds"] = tps
    for dtype in ("bf16", "fp32"):
        base = report["tokens_per_s"][f"{dtype}/torch"]
        for c in contenders[1:]:
            v = report["tokens_per_s"][f"{dtype}/{c}"]
            print(f"{dtype} {c}: {v:,.0f} tokens/s = {v / base:.3f}x plain PyTorch ({base:,.0f})")
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
