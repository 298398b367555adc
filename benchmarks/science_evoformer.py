"""DS4Sci_EvoformerAttention vs naive attention and SDPA with a float bias: peak extra memory and time.

Peak extra memory is the largest total of tensors allocated inside the call that are alive at once
(torch's MemTracker on CPU; inputs excluded). Run: ``python benchmarks/science_evoformer.py [N] [--backward]``.
"""

from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F  # noqa: N812
from torch.distributed._tools.mem_tracker import MemTracker

from deepshard.ops.deepspeed4science import DS4Sci_EvoformerAttention


def naive(q, k, v, biases):
    a = torch.matmul(q.transpose(-2, -3), k.transpose(-2, -3).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    for b in biases:
        a = a + b
    return torch.matmul(torch.softmax(a, dim=-1), v.transpose(-2, -3)).transpose(-2, -3)


def sdpa(q, k, v, biases):
    heads_first = [x.transpose(-2, -3) for x in (q, k, v)]
    return F.scaled_dot_product_attention(*heads_first, attn_mask=biases[0] + biases[1]).transpose(-2, -3)


def ours(q, k, v, biases):
    return DS4Sci_EvoformerAttention(q, k, v, biases)


def measure(fn, tensors, biases, backward):
    def call():
        out = fn(*tensors, biases)
        if backward:
            torch.autograd.grad(out, [*tensors, biases[1]], torch.ones_like(out))

    tracker = MemTracker()
    with tracker:
        call()
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    start = time.perf_counter()
    call()
    return peak, time.perf_counter() - start


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 and sys.argv[1].isdigit() else 512
    backward = "--backward" in sys.argv
    shape = (1, n, 256, 8, 8)
    torch.manual_seed(0)
    q, k, v = (torch.randn(shape, requires_grad=backward) for _ in range(3))
    mask = 1e9 * (torch.randint(0, 2, (1, n, 1, 1, 256)).float() - 1)
    pair = torch.randn(1, 1, 8, 256, 256, requires_grad=backward)
    results = {
        name: measure(fn, (q, k, v), [mask, pair], backward)
        for name, fn in [("ours", ours), ("naive", naive), ("sdpa", sdpa)]
    }
    what = "forward+backward" if backward else "forward"
    for name, (peak, secs) in results.items():
        print(f"{shape} fp32 {what} {name:5s}: peak extra {peak / 2**20:8.1f} MiB, {secs:6.2f} s")
    p0, t0 = results["ours"]
    print(
        f"ours/naive memory {p0 / results['naive'][0]:.3f}x, ours/sdpa memory {p0 / results['sdpa'][0]:.3f}x; "
        f"time ours/naive {t0 / results['naive'][1]:.2f}x, ours/sdpa {t0 / results['sdpa'][1]:.2f}x"
    )


if __name__ == "__main__":
    main()
