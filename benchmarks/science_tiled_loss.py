"""Peak RSS of the LM-head logits + cross-entropy (forward and backward), tiled vs untiled.

Each variant runs in a fresh process; its peak extra RSS is ``ru_maxrss`` at the end minus the RSS
after the inputs exist. Run: ``python benchmarks/science_tiled_loss.py [seq] [vocab] [hidden] [shards]``
(default 2048 49152 576 8: SmolLM2-135M's hidden size and vocab).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(variant: str, seq: int, vocab: int, hidden: int, shards: int) -> None:
    import torch
    import torch.nn.functional as F  # noqa: N812

    from deepshard.sequence import tiled_logits_loss

    torch.manual_seed(0)
    h = torch.randn(seq, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 0.02).requires_grad_()
    labels = torch.randint(0, vocab, (seq,))
    base = _rss_kib()
    start = time.perf_counter()
    if variant == "tiled":
        loss = tiled_logits_loss(h, w, labels, shards=shards)
    else:
        loss = F.cross_entropy(h @ w.T, labels)
    loss.backward()
    secs = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{(peak - base) / 1024:.1f} {secs:.2f} {loss.item():.6f}")


def main() -> None:
    args = [int(a) for a in sys.argv[1:5]] + [2048, 49152, 576, 8][len(sys.argv[1:5]) :]
    seq, vocab, hidden, shards = args
    got = {}
    for variant in ("untiled", "tiled"):
        out = subprocess.run(
            [sys.executable, __file__, "--child", variant, *map(str, args)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        got[variant] = (float(out[0]), float(out[1]), out[2])
        print(
            f"seq {seq} vocab {vocab} hidden {hidden} {variant:8s}: peak extra RSS {out[0]} MiB, {out[1]} s, loss {out[2]}"
        )
    print(
        f"tiled/untiled peak extra RSS: {got['tiled'][0] / got['untiled'][0]:.3f}x (shards={shards}); "
        f"time {got['tiled'][1] / got['untiled'][1]:.2f}x"
    )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], *map(int, sys.argv[3:7]))
    else:
        main()
