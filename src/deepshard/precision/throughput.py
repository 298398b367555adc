"""Measured matmul throughput per dtype, and the warning for half precision a CPU computes slowly.

Whether a CPU multiplies bf16/fp16 natively (AVX-512 BF16, AMX, AVX-512 FP16) is not visible from
PyTorch's capability string, and the difference is large: on an AVX2-only AMD EPYC a 1024x1024 bf16
matmul runs at ~1 GFLOP/s against ~60-100 GFLOP/s in fp32, so a "bf16" run there trains ~70x slower
than the same run in fp32. So it is measured: a short timed matmul per dtype, cached per process,
which ``deepshard report`` prints and :func:`warn_if_half_precision_is_slow` checks at initialize.
"""

from __future__ import annotations

import functools
import logging
import time

import torch

from deepshard.utils.logging import log_dist

SLOW_FACTOR = 4.0
"""Warn when half precision's measured matmul throughput is below fp32's divided by this. Native
half-precision units run 2-8x faster than fp32; emulated ones 50-100x slower, so any factor between
1 and ~50 separates the two; 4 leaves timing noise of a shared machine far from the decision."""


@functools.cache
def matmul_gflops(dtype: torch.dtype, device: str = "cpu", size: int = 256, budget_s: float = 0.05) -> float:
    """GFLOP/s of a ``size`` x ``size`` matmul in ``dtype`` on ``device`` with the current thread count.

    One warm-up product, then products until ``budget_s`` has passed (at least one); the best
    iteration's time counts, so a preempted iteration on a busy machine does not lower the figure.
    Cached per (dtype, device, size, budget) for the life of the process.
    """
    dev = torch.device(device)
    gen = torch.Generator(device=dev).manual_seed(0)
    a = torch.randn(size, size, generator=gen, device=dev).to(dtype)
    b = torch.randn(size, size, generator=gen, device=dev).to(dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a @ b  # warm-up: first-call dispatch and kernel selection
    sync()
    best = float("inf")
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        a @ b
        sync()
        t1 = time.perf_counter()
        best = min(best, t1 - t0)
        if t1 - start >= budget_s:
            break
    return 2.0 * size**3 / max(best, 1e-9) / 1e9


def half_precision_slowdown(dtype: torch.dtype, device: str = "cpu") -> tuple[float, float]:
    """``(half_gflops, fp32_gflops)`` measured by :func:`matmul_gflops` on ``device``."""
    return matmul_gflops(dtype, device), matmul_gflops(torch.float32, device)


def warn_if_half_precision_is_slow(dtype: torch.dtype, device: str = "cpu") -> bool:
    """Log one warning when ``dtype``'s matmul on ``device`` is :data:`SLOW_FACTOR` times slower than fp32.

    Only CPUs are measured (GPUs deepshard runs on compute bf16/fp16 natively). Rank 0 logs it; every
    rank returns whether it applies. The message names both measured figures and the config change that trains in fp32.
    """
    if dtype not in (torch.bfloat16, torch.float16) or torch.device(device).type != "cpu":
        return False
    half, fp32 = half_precision_slowdown(dtype, device)
    if half * SLOW_FACTOR >= fp32:
        return False
    name = "bf16" if dtype == torch.bfloat16 else "fp16"
    log_dist(
        f"the config asks for {name}, but this CPU computes {name} matmuls at {half:.1f} GFLOP/s against "
        f"{fp32:.1f} GFLOP/s in fp32 (a 256x256 matmul timed at initialize, {torch.get_num_threads()} "
        f"thread(s)): it has no native {name} units, so this run will be about {fp32 / max(half, 1e-9):.0f}x "
        f'slower than in fp32. Train in fp32 here: set "{name}": {{"enabled": false}} (DeepSpeed refuses '
        "fp16 on such CPUs; deepshard runs it and says so).",
        ranks=(0,),
        level=logging.WARNING,
    )
    return True
