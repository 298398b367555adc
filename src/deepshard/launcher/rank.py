"""The per-rank shim: ``python .../deepshard/launcher/rank.py [options] -- script args``.

The elastic agent starts this once per local rank with the rank's environment already set. It replaces
itself (``exec``) with the user's program, so the rank's pid, signals and exit code are the program's,
after three things DeepSpeed users expect:

- ``--local_rank=N`` right after the script (unless ``--no_local_rank``), as ``deepspeed`` passes it;
- with ``--bind_cores``, this rank's share of the node's cores (an even split by local rank) as its CPU
  affinity;
- the rank dies with its agent (``PR_SET_PDEATHSIG``), so killing an agent can never leave orphans.

It is run by path and imports nothing but the standard library, so it costs milliseconds per rank
(``-m deepshard.launcher.rank`` would import the whole ``deepshard`` package first).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(agent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent (the agent) exits; exit now if it already did."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the agent's own teardown still applies
        return
    if agent_pid and os.getppid() != agent_pid:
        os._exit(1)  # the agent died between fork and prctl


def core_share(cores: list[int], local_rank: int, local_world_size: int) -> list[int]:
    """The contiguous slice of ``cores`` that ``local_rank`` of ``local_world_size`` ranks gets."""
    per_rank = len(cores) // local_world_size
    if per_rank == 0:
        raise ValueError(
            f"cannot bind {local_world_size} ranks to {len(cores)} cores; give more cores or fewer ranks."
        )
    return cores[local_rank * per_rank : (local_rank + 1) * per_rank]


def program(
    script: str, script_args: list[str], local_rank: int, module: bool, no_python: bool, no_local_rank: bool
) -> list[str]:
    """The command line this rank runs: DeepSpeed's ``python -u script --local_rank=N args`` shape."""
    if no_python:
        cmd = [script]
    else:
        cmd = [sys.executable, "-u", *(["-m"] if module else []), script]
    if not no_local_rank:
        cmd.append(f"--local_rank={local_rank}")
    return cmd + script_args


def main(argv: list[str] | None = None) -> None:
    """Entry point: prepare the rank, then ``exec`` the user's program (never returns)."""
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--")
    options, (script, *script_args) = argv[:split], argv[split + 1 :]
    flags = {opt.split("=", 1)[0]: opt.partition("=")[2] for opt in options}
    die_with_parent(int(flags.get("--agent_pid") or 0))
    local_rank = int(os.environ["LOCAL_RANK"])
    if "--bind_cores" in flags:
        cores = [int(c) for c in flags["--bind_cores"].split(",")]
        share = core_share(cores, local_rank, int(os.environ["LOCAL_WORLD_SIZE"]))
        os.sched_setaffinity(0, share)  # the node already set OMP_NUM_THREADS to len(share)
    cmd = program(
        script,
        script_args,
        local_rank,
        module="--module" in flags,
        no_python="--no_python" in flags,
        no_local_rank="--no_local_rank" in flags,
    )
    os.execvp(cmd[0], cmd)


if __name__ == "__main__":
    main()
