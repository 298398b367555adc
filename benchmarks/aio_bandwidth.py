"""Disk bandwidth through deepshard's NVMe-tier IO engine (``deepshard.offload.aio``), page cache bypassed.

Writes ``--gib`` GiB in ``--slot-mib`` MiB slots with ``O_DIRECT`` (or ``fdatasync`` where the
filesystem refuses it), then reads them back, for each ``--threads`` setting; prints GiB/s.

    python benchmarks/aio_bandwidth.py --dir /tmp --gib 2 --threads 1,2,4
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from deepshard.offload.aio import AsyncIO, SwapFiles, aligned_empty


def run(directory: str, gib: float, slot_mib: int, threads: int, block_mib: int, depth: int) -> dict[str, float]:
    slot = slot_mib << 20
    count = max(1, int(gib * (1 << 30)) // slot)
    files = SwapFiles(directory, needed_bytes=count * slot, sync=True,
                      engine=AsyncIO(block_size=block_mib << 20, queue_depth=depth, thread_count=threads))  # fmt: skip
    buffers = [aligned_empty(slot) for _ in range(min(count, 8))]
    for b in buffers:
        b.copy_(torch.randint(0, 255, (b.numel(),), dtype=torch.uint8))
    for i in range(count):
        files.slot(f"s{i}", slot)
    start = time.perf_counter()
    for f in [files.write(f"s{i}", buffers[i % len(buffers)]) for i in range(count)]:
        f.result()
    write_s = time.perf_counter() - start
    start = time.perf_counter()
    for f in [files.read(f"s{i}", buffers[i % len(buffers)]) for i in range(count)]:
        f.result()
    read_s = time.perf_counter() - start
    direct = files.direct
    files.close()
    total = count * slot / 2**30
    return {"threads": threads, "gib": total, "o_direct": direct, "write_gib_s": total / write_s, "read_gib_s": total / read_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default="/tmp")
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--slot-mib", type=int, default=64)
    parser.add_argument("--block-mib", type=int, default=1)
    parser.add_argument("--queue-depth", type=int, default=8)
    parser.add_argument("--threads", default="1,2,4")
    args = parser.parse_args()
    for t in (int(x) for x in args.threads.split(",")):
        print(json.dumps(run(args.dir, args.gib, args.slot_mib, t, args.block_mib, args.queue_depth)))


if __name__ == "__main__":
    main()
