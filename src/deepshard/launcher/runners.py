"""The command lines that start one node agent per host: local, ssh, pdsh, SLURM and MPI.

Every runner starts the same per-node agent (:mod:`deepshard.launcher.node`); they differ only in how
the agent reaches each host and learns its node rank:

=========  ==========================================  ============================================
runner     how the agents start                        node rank
=========  ==========================================  ============================================
local      one child process, this machine             ``--node_rank`` (0 unless given)
ssh        one ``ssh host CMD`` per host                the host's position in the resource map
pdsh       one ``pdsh -w hosts CMD``                     pdsh substitutes ``%n``
slurm      one ``srun --ntasks-per-node=1 CMD``          c10d rendezvous at master_addr:master_port
openmpi    one ``mpirun --map-by ppr:1:node CMD``        c10d rendezvous
mpich      one ``mpirun -ppn 1 CMD``                     c10d rendezvous
=========  ==========================================  ============================================

The runners only build commands (:class:`Plan`); :mod:`deepshard.launcher.supervise` runs them.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from deepshard.launcher.hostfile import ResourceMap

# Variables forwarded to remote hosts: DeepSpeed's prefixes (runner.EXPORT_ENVS, Nebula, CUDA's NCCL)
# plus deepshard's own.
EXPORT_PREFIXES = ("MLFLOW", "PYTHON", "MV2", "UCX", "NEBULA", "NCCL", "DEEPSHARD")
ENV_FILES = (".deepshard_env", os.environ.get("DS_ENV_FILE", ".deepspeed_env"))
PDSH_MAX_FAN_OUT = 1024


@dataclass(frozen=True)
class NodeOptions:
    """Everything every node agent of one job is told, besides its node rank and slots."""

    script: str
    script_args: list[str]
    nnodes: int
    master_addr: str
    master_port: int
    job_id: str
    module: bool = False
    no_python: bool = False
    no_local_rank: bool = False
    log_dir: str | None = None
    bind_cores_to_rank: bool = False
    bind_core_list: str | None = None
    min_nodes: int = -1  # elastic: fewest nodes; with elastic the agents use c10d rendezvous
    max_restarts: int = 0
    elastic: bool = False

    def argv(self, node_rank: str, slots: list[int], rdzv: bool, watch_stdin: bool) -> list[str]:
        """``python -u -m deepshard.launcher.node ...`` for one node (``node_rank`` may be ``%n``)."""
        cmd = [
            sys.executable,
            "-u",
            "-m",
            "deepshard.launcher.node",
            f"--nnodes={self.nnodes}",
            f"--nproc_per_node={len(slots)}",
            "--slots=" + ",".join(map(str, slots)),
            f"--master_addr={self.master_addr}",
            f"--master_port={self.master_port}",
            f"--job_id={self.job_id}",
            f"--max_restarts={self.max_restarts}",
        ]
        if rdzv or self.elastic:
            cmd += ["--rdzv", f"--min_nodes={self.min_nodes}"]
        else:
            cmd.append(f"--node_rank={node_rank}")
        for flag in ("module", "no_python", "no_local_rank", "bind_cores_to_rank"):
            if getattr(self, flag):
                cmd.append(f"--{flag}")
        if self.log_dir:
            cmd.append(f"--log_dir={os.path.abspath(self.log_dir)}")
        if self.bind_core_list:
            cmd.append(f"--bind_core_list={self.bind_core_list}")
        if watch_stdin:
            cmd.append("--watch_stdin")
        return [*cmd, "--", self.script, *self.script_args]


@dataclass(frozen=True)
class RunnerArgs:
    """The launcher flags that only the multi-node runners read."""

    launcher_args: str = ""  # --launcher_args, split like a shell would
    ssh_port: int | None = None
    comment: str = ""  # srun --comment
    account: str = ""  # srun --account


@dataclass
class Plan:
    """Processes to start on this machine for one job, and how to stop them."""

    commands: list[list[str]]
    labels: list[str]  # one per command, for messages: a host name or the runner's name
    env: dict[str, str]
    stdin_pipe: bool = False  # stop a command by closing its stdin (its agent watches stdin)
    kill_command: list[str] | None = None  # run after a failure or Ctrl-C (pdsh)


def collect_exports(env: Mapping[str, str], search_dirs: list[str]) -> dict[str, str]:
    """Variables to set on every host: ``EXPORT_PREFIXES`` from ``env``, then the env files.

    ``.deepshard_env`` and ``.deepspeed_env`` (``DS_ENV_FILE``) hold ``KEY=VALUE`` lines; they are
    read from each of ``search_dirs`` in order (DeepSpeed reads ``~`` then ``.``), later files winning.
    """
    exports = {k: v for k, v in env.items() if k.startswith(EXPORT_PREFIXES)}
    for directory in search_dirs:
        for name in ENV_FILES:
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                exports.update(read_env_file(path))
    return exports


def read_env_file(path: str) -> dict[str, str]:
    """Parse a ``KEY=VALUE`` per line env file; ``#`` comments and blank lines are skipped."""
    values: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for number, raw in enumerate(handle, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or not key.strip().isidentifier():
                raise ValueError(f"{path}:{number}: {line!r} is not 'KEY=VALUE'; fix the line or remove it.")
            values[key.strip()] = value.strip()
    return values


def _remote_shell(opts: NodeOptions, exports: dict[str, str], node_argv: list[str]) -> str:
    """One shell string for a remote host: exports, ``cd`` to this directory, the node command."""
    parts = [f"export {k}={shlex.quote(v)};" for k, v in exports.items()]
    parts.append(f"cd {shlex.quote(os.getcwd())};")
    parts.append(shlex.join(node_argv))  # pdsh replaces %n even inside quotes
    return " ".join(parts)


def local_plan(opts: NodeOptions, slots: list[int], node_rank: int, env: dict[str, str]) -> Plan:
    """This machine runs one node of the job (all of it when ``opts.nnodes == 1``)."""
    cmd = opts.argv(str(node_rank), slots, rdzv=False, watch_stdin=True)
    return Plan([cmd], [f"node {node_rank}"], env, stdin_pipe=True)


def ssh_plan(
    opts: NodeOptions, resources: ResourceMap, exports: dict[str, str], env: dict[str, str], how: RunnerArgs
) -> Plan:
    """One ``ssh`` per host; closing its stdin stops that host's agent."""
    port = ["-p", str(how.ssh_port)] if how.ssh_port else []
    commands = []
    for node_rank, (host, slots) in enumerate(resources.items()):
        node = opts.argv(str(node_rank), slots, rdzv=False, watch_stdin=True)
        commands.append(
            [
                "ssh",
                "-o",
                "BatchMode=yes",
                *port,
                *shlex.split(how.launcher_args),
                host,
                _remote_shell(opts, exports, node),
            ]
        )
    return Plan(commands, list(resources), env, stdin_pipe=True)


def pdsh_plan(
    opts: NodeOptions, resources: ResourceMap, exports: dict[str, str], env: dict[str, str], how: RunnerArgs
) -> Plan:
    """One ``pdsh`` for all hosts (DeepSpeed's default); a tagged ``pkill`` stops them."""
    slot_lists = list(resources.values())
    if any(len(s) != len(slot_lists[0]) for s in slot_lists):
        raise ValueError(
            "--launcher pdsh runs the same command on every host, but the hosts have different slot counts "
            f"({ {h: len(s) for h, s in resources.items()} }); use --launcher ssh or equal slots."
        )
    env = {**env, "PDSH_RCMD_TYPE": "ssh"}
    if how.ssh_port:
        env["PDSH_SSH_ARGS_APPEND"] = f"{env.get('PDSH_SSH_ARGS_APPEND', '')} -p {how.ssh_port}".strip()
    pdsh = [
        "pdsh",
        "-S",
        "-f",
        str(PDSH_MAX_FAN_OUT),
        "-w",
        ",".join(resources),
        *shlex.split(how.launcher_args),
    ]
    node = opts.argv("%n", slot_lists[0], rdzv=False, watch_stdin=False)
    # "[-]-job_id" matches the agents' "--job_id" but not the shell that runs this pkill.
    kill = [*pdsh, f"pkill -TERM -f -- '[-]-job_id={opts.job_id}'"]
    return Plan([[*pdsh, _remote_shell(opts, exports, node)]], ["pdsh"], env, kill_command=kill)


def _uniform_slots(resources: ResourceMap, launcher: str) -> list[int]:
    slot_lists = list(resources.values())
    if any(s != slot_lists[0] for s in slot_lists):
        raise ValueError(
            f"--launcher {launcher} starts one identical agent per node, but the hosts use different slots "
            f"({resources}); give every host the same slots, or use --launcher ssh."
        )
    return slot_lists[0]


def slurm_plan(
    opts: NodeOptions, resources: ResourceMap, exports: dict[str, str], env: dict[str, str], how: RunnerArgs
) -> Plan:
    """``srun`` one agent per node; the agents meet through c10d rendezvous on the master."""
    slots = _uniform_slots(resources, "slurm")
    srun = [
        "srun",
        f"--nodes={len(resources)}",
        f"--ntasks={len(resources)}",
        "--ntasks-per-node=1",
        "--kill-on-bad-exit=1",
        "--nodelist=" + ",".join(resources),
    ]
    if how.comment:
        srun.append(f"--comment={how.comment}")
    if how.account:
        srun.append(f"--account={how.account}")
    srun.append("--export=" + ",".join(["ALL", *(f"{k}={v}" for k, v in exports.items())]))
    srun += shlex.split(how.launcher_args)
    return Plan([srun + opts.argv("0", slots, rdzv=True, watch_stdin=False)], ["srun"], env)


def openmpi_plan(
    opts: NodeOptions, resources: ResourceMap, exports: dict[str, str], env: dict[str, str], how: RunnerArgs
) -> Plan:
    """OpenMPI ``mpirun`` one agent per node (``ppr:1:node``); c10d rendezvous."""
    slots = _uniform_slots(resources, "openmpi")
    mpirun = [
        "mpirun",
        "--allow-run-as-root",
        "-np",
        str(len(resources)),
        "--map-by",
        "ppr:1:node",
        "--bind-to",
        "none",
        "--host",
        ",".join(f"{h}:1" for h in resources),
    ]
    for key, value in exports.items():
        mpirun += ["-x", f"{key}={value}"]
    mpirun += shlex.split(how.launcher_args)
    return Plan([mpirun + opts.argv("0", slots, rdzv=True, watch_stdin=False)], ["mpirun"], env)


def mpich_plan(
    opts: NodeOptions, resources: ResourceMap, exports: dict[str, str], env: dict[str, str], how: RunnerArgs
) -> Plan:
    """MPICH / Hydra ``mpirun`` one agent per node (``-ppn 1``); c10d rendezvous."""
    slots = _uniform_slots(resources, "mpich")
    mpirun = ["mpirun", "-n", str(len(resources)), "-ppn", "1", "-hosts", ",".join(resources)]
    for key, value in exports.items():
        mpirun += ["-genv", key, value]
    mpirun += shlex.split(how.launcher_args)
    return Plan([mpirun + opts.argv("0", slots, rdzv=True, watch_stdin=False)], ["mpirun"], env)


PlanBuilder = Callable[[NodeOptions, ResourceMap, dict[str, str], dict[str, str], RunnerArgs], Plan]

# --launcher name -> (program that must be on PATH, plan builder)
MULTINODE_RUNNERS: dict[str, tuple[str, PlanBuilder]] = {
    "pdsh": ("pdsh", pdsh_plan),
    "ssh": ("ssh", ssh_plan),
    "slurm": ("srun", slurm_plan),
    "openmpi": ("mpirun", openmpi_plan),
    "mpich": ("mpirun", mpich_plan),
}


def require_program(launcher: str) -> None:
    """Fail with the fix when the runner's program is not installed here."""
    program = MULTINODE_RUNNERS[launcher][0]
    if shutil.which(program) is None:
        raise ValueError(
            f"--launcher {launcher} needs '{program}' on PATH, which is not installed here; install it "
            f"or choose another runner ({', '.join(MULTINODE_RUNNERS)})."
        )
