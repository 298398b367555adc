"""A tiny gloo job for the launcher tests: every rank all-reduces and records what it saw.

Usage: rank_probe.py [--local_rank N] --out DIR --tag TAG [--fail_rank R] [--sleep S] [--skip_collective]
Each rank writes DIR/rank<R>.json with its environment and the all-reduced sum of (rank + 1), then,
if asked, one rank fails and the others sleep (to check that the launcher tears them down).
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--tag", required=True)  # marks this job's processes for the orphan check
    parser.add_argument("--fail_rank", type=int, default=-1)
    parser.add_argument("--sleep", type=float, default=0.0)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    record = {
        "argv_local_rank": args.local_rank,
        "allreduce": total.item(),
        "pid": os.getpid(),
        **{
            k: os.environ.get(k)
            for k in (
                "RANK",
                "LOCAL_RANK",
                "WORLD_SIZE",
                "LOCAL_WORLD_SIZE",
                "MASTER_ADDR",
                "MASTER_PORT",
                "OMP_NUM_THREADS",
                "DEEPSHARD_TEST_EXPORT",
            )
        },
        "affinity": sorted(os.sched_getaffinity(0)),
    }
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as handle:
        json.dump(record, handle)
    if rank == args.fail_rank:
        print(f"rank {rank}: failing on purpose", file=sys.stderr, flush=True)
        os._exit(3)  # sys.exit with a live gloo group may abort (SIGABRT) in gloo's threads instead
    time.sleep(args.sleep)  # not in a collective: only the launcher can stop this rank early
    if args.fail_rank < 0:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
