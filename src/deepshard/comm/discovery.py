"""Find this process's rank, world size and rendezvous address from the launcher's environment.

torchrun (and the ``deepshard`` launcher) set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/
``MASTER_PORT``. Under ``mpirun`` or ``srun`` only the scheduler's own variables exist; the functions
here translate them so that ``env://`` initialisation works unchanged.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

_TORCH_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str | None
    source: str  # "env", "mpi", "slurm" or "single"


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for ch in text:
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        depth += ch == "["
        depth -= ch == "]"
        current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p]


def _expand_one(name: str) -> list[str]:
    """Expand every bracket group of one host pattern (a cartesian product, left to right)."""
    match = re.search(r"\[([^\]]+)\]", name)
    if not match:
        return [name]
    prefix, suffix = name[: match.start()], name[match.end() :]
    out: list[str] = []
    for item in match.group(1).split(","):
        if "-" in item:
            lo, hi = item.split("-", 1)
            width = len(lo)
            values = [f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1)]
        else:
            values = [item]
        for value in values:
            out.extend(_expand_one(prefix + value + suffix))
    return out


def expand_slurm_nodelist(nodelist: str) -> list[str]:
    """Expand a SLURM node list such as ``"gpu[01-03,07],r[1-2]-n[1-2]"`` into host names, in order."""
    hosts: list[str] = []
    for part in _split_top_level(nodelist):
        hosts.extend(_expand_one(part))
    return hosts


def _slurm_tasks_per_node(value: str) -> int:
    """First node's task count from ``SLURM_TASKS_PER_NODE`` (e.g. ``"4(x2),2"`` → 4)."""
    match = re.match(r"(\d+)", value)
    return int(match.group(1)) if match else 1


def discover(env: Mapping[str, str] | None = None) -> RankInfo:
    """Read rank information from torchrun, Open MPI / MPICH / Intel MPI, or SLURM variables.

    Precedence: torchrun-style variables, then MPI, then SLURM; with none of them the process is a
    single-rank job.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankInfo(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
            master_addr=env.get("MASTER_ADDR"),
            source="env",
        )
    for rank_key, size_key, local_key, local_size_key in (
        (
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_SIZE",
        ),
        ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
        ("PMIX_RANK", "PMIX_SIZE", "PMIX_LOCAL_RANK", "PMIX_LOCAL_SIZE"),
    ):
        if rank_key in env and size_key in env:
            size = int(env[size_key])
            return RankInfo(
                rank=int(env[rank_key]),
                world_size=size,
                local_rank=int(env.get(local_key, env[rank_key] if size == 1 else "0")),
                local_world_size=int(env.get(local_size_key, "1")),
                master_addr=env.get("MASTER_ADDR"),
                source="mpi",
            )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", ""))
        hosts = expand_slurm_nodelist(nodelist) if nodelist else []
        return RankInfo(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            local_world_size=_slurm_tasks_per_node(env.get("SLURM_TASKS_PER_NODE", "1")),
            master_addr=env.get("MASTER_ADDR") or (hosts[0] if hosts else None),
            source="slurm",
        )
    return RankInfo(0, 1, 0, 1, env.get("MASTER_ADDR"), "single")


def _mpi_master_addr() -> str | None:
    """Rank 0's address broadcast over MPI, when mpi4py is installed."""
    try:
        from mpi4py import MPI  # type: ignore[import-not-found]
    except ImportError:
        return None
    comm = MPI.COMM_WORLD
    addr = socket.gethostbyname(socket.gethostname()) if comm.Get_rank() == 0 else None
    return str(comm.bcast(addr, root=0))


def export_torch_env(info: RankInfo, port: int) -> None:
    """Write the torchrun-style variables for ``info`` into ``os.environ`` (only those not set)."""
    master = info.master_addr
    if master is None and info.source == "mpi":
        master = _mpi_master_addr()
    if master is None:
        if info.world_size == info.local_world_size or info.world_size == 1:
            master = "127.0.0.1"
        else:
            raise ValueError(
                f"cannot find the rendezvous address for a {info.world_size}-rank {info.source} job spanning "
                "several nodes: set MASTER_ADDR to rank 0's host (or install mpi4py so it can be broadcast)."
            )
    values = {
        "RANK": str(info.rank),
        "WORLD_SIZE": str(info.world_size),
        "LOCAL_RANK": str(info.local_rank),
        "LOCAL_WORLD_SIZE": str(info.local_world_size),
        "MASTER_ADDR": master,
        "MASTER_PORT": str(port),
    }
    for key, value in values.items():
        os.environ.setdefault(key, value)


def has_torch_env(env: Mapping[str, str] | None = None) -> bool:
    """Whether all of torchrun's rendezvous variables are present."""
    env = os.environ if env is None else env
    return all(key in env for key in _TORCH_KEYS)
