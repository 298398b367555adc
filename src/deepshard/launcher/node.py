"""The per-node agent: ``python -m deepshard.launcher.node [options] -- script args``.

Every runner (local, ssh, pdsh, SLURM, MPI) starts exactly this command once per node. It prepares the
node's environment (thread count, visible accelerators) and then runs PyTorch's elastic agent
(``torch.distributed.run``) in this process; the agent starts the local ranks, sets ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` and, when one
rank fails, stops the others. Each rank starts through :mod:`deepshard.launcher.rank`, which binds cores,
adds ``--local_rank`` and ties the rank's life to the agent's.

When any rank fails the agent exits non-zero and this module logs the failing rank's last lines. With
``--watch_stdin`` the agent also shuts the node down when its standard input closes, which is how the
launcher (local or through ssh) stops a node even if the launcher itself is killed.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

TAIL_LINES = 20
_PREFIX_TEMPLATE = "[rank${rank}]:"  # console prefix of each tee'd line, by global rank


def accelerator_count() -> int:
    """The number of NVIDIA GPUs visible here, without importing torch (0 on a CPU-only machine)."""
    if not Path("/proc/driver/nvidia/gpus").is_dir():
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    return len(list(Path("/proc/driver/nvidia/gpus").iterdir()))


def parse_core_list(text: str) -> list[int]:
    """Parse ``"1,3-5,7"`` into ``[1, 3, 4, 5, 7]`` (DeepSpeed's ``--bind_core_list`` syntax)."""
    cores: list[int] = []
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            span = range(int(first), int(last) + 1) if sep else range(int(first), int(first) + 1)
        except ValueError:
            raise ValueError(
                f"--bind_core_list {text!r}: {part!r} is not a core number or range; write e.g. '0-3,8,10-11'."
            ) from None
        cores.extend(c for c in span if c not in cores)
    return cores


def node_cores(bind_core_list: str | None) -> list[int]:
    """The cores this node's ranks share: ``--bind_core_list`` or the agent's CPU affinity."""
    if bind_core_list:
        return parse_core_list(bind_core_list)
    return sorted(os.sched_getaffinity(0))


def threads_per_rank(cores: int, nproc: int) -> int:
    """Threads for each of ``nproc`` ranks sharing ``cores`` cores: an even split, at least one."""
    return max(1, cores // max(1, nproc))


def build_parser() -> argparse.ArgumentParser:
    """Options of the per-node agent; the launcher fills them in, users rarely type them."""
    parser = argparse.ArgumentParser(prog="python -m deepshard.launcher.node", description=__doc__)
    parser.add_argument("--nnodes", type=int, required=True)
    parser.add_argument("--node_rank", type=int, default=0)
    parser.add_argument("--nproc_per_node", type=int, required=True)
    parser.add_argument("--slots", default="", help="accelerator indices of this node, e.g. '0,1'")
    parser.add_argument("--master_addr", default="127.0.0.1")
    parser.add_argument("--master_port", type=int, default=29500)
    parser.add_argument("--rdzv", action="store_true", help="c10d rendezvous at master_addr:master_port")
    parser.add_argument("--min_nodes", type=int, default=-1, help="elastic: fewest nodes (with --rdzv)")
    parser.add_argument("--max_restarts", type=int, default=0)
    parser.add_argument("--job_id", default="deepshard")
    parser.add_argument(
        "--log_dir", default=None, help="write each rank's output here instead of the console"
    )
    parser.add_argument("--module", action="store_true")
    parser.add_argument("--no_python", action="store_true")
    parser.add_argument("--no_local_rank", action="store_true")
    parser.add_argument("--bind_cores_to_rank", action="store_true")
    parser.add_argument("--bind_core_list", default=None)
    parser.add_argument("--watch_stdin", action="store_true", help="shut the node down when stdin closes")
    parser.add_argument("script")
    parser.add_argument("script_args", nargs=argparse.REMAINDER)
    return parser


def prepare_environment(args: argparse.Namespace) -> list[int]:
    """Set the node's thread count and visible accelerators; return the cores the ranks share."""
    cores = node_cores(args.bind_core_list)
    if args.bind_cores_to_rank and len(cores) < args.nproc_per_node:
        raise ValueError(
            f"--bind_cores_to_rank: {len(cores)} cores ({cores}) cannot be split among "
            f"{args.nproc_per_node} ranks; give --bind_core_list more cores or start fewer processes."
        )
    if "OMP_NUM_THREADS" not in os.environ:  # a value the user set wins
        os.environ["OMP_NUM_THREADS"] = str(threads_per_rank(len(cores), args.nproc_per_node))
    if args.slots and accelerator_count() > 0:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.slots
    os.environ.setdefault("TORCHELASTIC_LOG_LINE_PREFIX_TEMPLATE", _PREFIX_TEMPLATE)
    return cores


def torchrun_argv(args: argparse.Namespace, cores: list[int], log_dir: str, tee: bool) -> list[str]:
    """The ``torch.distributed.run`` command line for this node (after ``torchrun``)."""
    if args.rdzv:
        low = args.min_nodes if args.min_nodes > 0 else args.nnodes
        agent = [
            f"--nnodes={low}:{args.nnodes}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={args.master_addr}:{args.master_port}",
            f"--rdzv_id={args.job_id}",
        ]
    else:
        agent = [
            f"--nnodes={args.nnodes}",
            f"--node_rank={args.node_rank}",
            f"--master_addr={args.master_addr}",
            f"--master_port={args.master_port}",
        ]
    # by path, not "-m deepshard.launcher.rank": the shim must not import the deepshard package (torch)
    rank_shim = ["-u", str(Path(__file__).with_name("rank.py")), f"--agent_pid={os.getpid()}"]
    if args.bind_cores_to_rank:
        rank_shim.append("--bind_cores=" + ",".join(map(str, cores)))
    for flag in ("module", "no_python", "no_local_rank"):
        if getattr(args, flag):
            rank_shim.append(f"--{flag}")
    output = ["--tee=3"] if tee else ["--redirects=3"]
    return [
        *agent,
        f"--nproc_per_node={args.nproc_per_node}",
        f"--max_restarts={args.max_restarts}",
        f"--log_dir={log_dir}",
        *output,
        "--no_python",
        sys.executable,
        *rank_shim,
        "--",
        args.script,
        *args.script_args,
    ]


def _tail(log_dir: str, local_rank: int) -> list[str]:
    """Last lines of a local rank's stderr (or stdout when stderr is empty), newest attempt first."""
    pattern = os.path.join(glob.escape(log_dir), "*", "attempt_*", str(local_rank))
    for rank_dir in sorted(glob.glob(pattern), key=os.path.getmtime, reverse=True):
        for name in ("stderr.log", "stdout.log"):
            path = os.path.join(rank_dir, name)
            if os.path.isfile(path):
                with open(path, encoding="utf-8", errors="replace") as handle:
                    lines = handle.read().splitlines()
                if lines:
                    return lines[-TAIL_LINES:]
    return []


def _watch_stdin() -> None:
    """Block until stdin closes, then stop this node the way a SIGTERM would."""
    while os.read(0, 4096):  # a raw read: a daemon thread must not hold sys.stdin's lock at exit
        pass
    logger.warning("launcher connection closed: stopping this node's ranks")
    os.kill(os.getpid(), signal.SIGTERM)


def run_agent(args: argparse.Namespace) -> int:
    """Run the elastic agent for this node; return the exit code for the node."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args as torchrun_parse_args
    from torch.distributed.run import run as torchrun_run

    cores = prepare_environment(args)
    own_log_dir = args.log_dir is None
    log_dir = tempfile.mkdtemp(prefix="deepshard-logs-") if own_log_dir else args.log_dir
    if args.watch_stdin:
        threading.Thread(target=_watch_stdin, name="deepshard-stdin-watch", daemon=True).start()
    try:
        torchrun_run(torchrun_parse_args(torchrun_argv(args, cores, log_dir, tee=own_log_dir)))
        return 0
    except ChildFailedError as err:
        global_rank, failure = err.get_first_failure()
        lines = _tail(log_dir, failure.local_rank)
        logger.error(
            "rank %d (local rank %d on node %d) failed with exit code %d; its last %d lines:\n%s",
            global_rank,
            failure.local_rank,
            args.node_rank,
            failure.exitcode,
            len(lines),
            "\n".join(f"  | {line}" for line in lines) or "  | (no output)",
        )
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # killed by a signal
    except SignalException as err:
        logger.warning("node %d stopped by %s", args.node_rank, signal.Signals(err.sigval).name)
        return 128 + int(err.sigval)
    finally:
        if own_log_dir:
            shutil.rmtree(log_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m deepshard.launcher.node``."""
    logging.basicConfig(level=logging.INFO, format="deepshard: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return run_agent(args)
    except ValueError as err:
        logger.error("%s", err)
        return 2


if __name__ == "__main__":
    sys.exit(main())
