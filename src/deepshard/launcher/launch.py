"""``deepshard [launcher flags] script.py [script args]``: DeepSpeed's launcher interface.

The flags, their defaults and the hostfile format are DeepSpeed's (``deepspeed --num_gpus 4 train.py``
starts the same job as ``deepshard --num_gpus 4 train.py``). The launcher decides which hosts and slots
the job uses, builds one node-agent command per host (:mod:`deepshard.launcher.runners`) and supervises
them (:mod:`deepshard.launcher.supervise`). It imports nothing from torch: the agents do that.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import subprocess
import uuid

from deepshard.launcher.hostfile import DEFAULT_HOSTFILE, ResourceMap, read_hostfile, select_resources
from deepshard.launcher.node import accelerator_count
from deepshard.launcher.runners import (
    MULTINODE_RUNNERS,
    NodeOptions,
    Plan,
    RunnerArgs,
    collect_exports,
    local_plan,
    require_program,
)
from deepshard.launcher.supervise import run_plan

logger = logging.getLogger(__name__)

DEFAULT_MASTER_PORT = 29500  # TORCH_DISTRIBUTED_DEFAULT_PORT


def build_parser(prog: str = "deepshard") -> argparse.ArgumentParser:
    """The launcher's flags: DeepSpeed's names, meanings and defaults."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Launch a (multi-node) distributed training job. Subcommands: 'deepshard report'.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "-H",
        "--hostfile",
        default=None,
        help=f"MPI-style hostfile ('worker-0 slots=4' lines); default {DEFAULT_HOSTFILE}, "
        "and a local run when that file does not exist",
    )
    p.add_argument("-i", "--include", default="", help="resources to use, 'host[:slot,slot]@host...'")
    p.add_argument("-e", "--exclude", default="", help="resources to leave out, same format as --include")
    p.add_argument("--num_nodes", type=int, default=-1, help="use the first N hosts of the hostfile")
    p.add_argument(
        "--num_gpus",
        "--num_accelerators",
        type=int,
        default=-1,
        help="accelerators (processes) per node, slots [0, N); on a CPU-only machine, processes",
    )
    p.add_argument("--num_procs", type=int, default=-1, help="processes per node (for CPU machines)")
    p.add_argument(
        "--master_addr",
        default="",
        help="address of node 0 (default: 127.0.0.1 for a local "
        "run, else the first host's 'hostname -I' over ssh)",
    )
    p.add_argument("--master_port", type=int, default=DEFAULT_MASTER_PORT, help="port of the rendezvous")
    p.add_argument(
        "--node_rank",
        type=int,
        default=-1,
        help="run only node N of the hostfile here (one launcher per node, no ssh)",
    )
    p.add_argument("--no_ssh", action="store_true", help="with --node_rank: launch each node by hand")
    p.add_argument(
        "--launcher",
        default="pdsh",
        type=str.lower,
        choices=sorted(MULTINODE_RUNNERS),
        help="multi-node runner",
    )
    p.add_argument("--launcher_args", default="", help="extra arguments for the runner, one quoted string")
    p.add_argument("--ssh_port", type=int, default=None, help="ssh port for the ssh and pdsh runners")
    p.add_argument("--comment", default="", help="srun --comment (slurm runner)")
    p.add_argument("--account", default="", help="srun --account (slurm runner)")
    p.add_argument("--module", action="store_true", help="run the script as 'python -m script'")
    p.add_argument("--no_python", action="store_true", help="run the script as an executable, not via python")
    p.add_argument("--no_local_rank", action="store_true", help="do not pass --local_rank to the script")
    p.add_argument("--force_multi", action="store_true", help="use the multi-node runner even for one host")
    p.add_argument(
        "--enable_each_rank_log",
        default=None,
        metavar="DIR",
        help="write each rank's stdout/stderr to files under DIR instead of the console",
    )
    p.add_argument("--bind_cores_to_rank", action="store_true", help="give each rank its share of the cores")
    p.add_argument("--bind_core_list", default=None, help="cores to share out, e.g. '0-7,16-23'")
    p.add_argument(
        "--elastic_training",
        action="store_true",
        help="elastic job through torch's c10d rendezvous (needs --master_addr)",
    )
    p.add_argument("--min_elastic_nodes", type=int, default=-1, help="elastic: fewest nodes (default 1)")
    p.add_argument(
        "--max_elastic_nodes",
        type=int,
        default=-1,
        help="elastic: most nodes (default: the nodes of the job)",
    )
    p.add_argument("--max_restarts", type=int, default=0, help="times the agents restart a failed job")
    p.add_argument(
        "--as_deepspeed",
        "--as-deepspeed",
        default="auto",
        choices=("auto", "on", "off"),
        help="make the script's 'import deepspeed' resolve to deepshard (deepshard.compat); auto: on unless "
        "DeepSpeed itself is installed",
    )
    p.add_argument("user_script", help="the training script (or module, or program), then its arguments")
    p.add_argument("user_args", nargs=argparse.REMAINDER)
    return p


def _check_script(args: argparse.Namespace) -> None:
    if args.module:
        return
    if args.no_python:
        if shutil.which(args.user_script) is None:
            raise ValueError(
                f"program {args.user_script!r} (--no_python) is not an executable on PATH; "
                "give its path or drop --no_python to run a Python script."
            )
    elif not os.path.isfile(args.user_script):
        raise ValueError(
            f"training script {args.user_script!r} does not exist (working directory {os.getcwd()}); "
            "check the path, or pass --module to run a Python module."
        )


def _slots_per_node(args: argparse.Namespace, accelerators: int) -> int:
    """``--num_gpus``/``--num_procs`` as one slot count (-1: not given)."""
    if args.num_procs > 0 and args.num_gpus > 0 and args.num_procs != args.num_gpus:
        raise ValueError(
            f"--num_procs {args.num_procs} and --num_gpus {args.num_gpus} disagree; pass only one of them."
        )
    if args.num_gpus > 0 and accelerators == 0 and args.num_procs <= 0:
        logger.info(
            "no accelerator on this machine: --num_gpus %d starts %d CPU processes per node",
            args.num_gpus,
            args.num_gpus,
        )
    return max(args.num_procs, args.num_gpus)


def local_pool(accelerators: int) -> dict[str, int]:
    """The resource pool of a run without hostfile: this machine's accelerators, or one CPU process."""
    return {"localhost": accelerators if accelerators > 0 else 1}


def resolve_resources(args: argparse.Namespace) -> ResourceMap:
    """The job's ``{host: slots}``: the hostfile (or this machine) filtered by the flags."""
    accelerators = accelerator_count()
    slots = _slots_per_node(args, accelerators)
    pool = read_hostfile(args.hostfile or DEFAULT_HOSTFILE, explicit=args.hostfile is not None)
    if pool is None:
        if args.num_nodes > 1:
            raise ValueError(
                f"--num_nodes {args.num_nodes} needs a hostfile listing the hosts, but there is none at "
                f"{args.hostfile or DEFAULT_HOSTFILE}; pass -H/--hostfile."
            )
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        if accelerators and visible and not (args.include or args.exclude or slots > 0):
            # DeepSpeed turns CUDA_VISIBLE_DEVICES into --include=localhost:<ids> for a local run
            ids = [int(d) for d in visible.split(",") if d.strip().isdigit()]
            return {"localhost": ids}
        pool = local_pool(accelerators)
    return select_resources(pool, args.include, args.exclude, args.num_nodes, slots)


def _master_addr(args: argparse.Namespace, resources: ResourceMap, multi_node: bool) -> str:
    if args.master_addr:
        return str(args.master_addr)
    if not multi_node:
        if len(resources) > 1:
            raise ValueError(
                "--node_rank runs one node of a multi-node job here, so the other nodes need an address to "
                "meet at; pass --master_addr with node 0's IP address."
            )
        return "127.0.0.1"
    first = next(iter(resources))
    if args.launcher in ("ssh", "pdsh"):  # hostfile names may be ssh aliases: ask the host its IP
        port = ["-p", str(args.ssh_port)] if args.ssh_port else []
        result = subprocess.run(["ssh", *port, first, "hostname", "-I"], capture_output=True, text=True)
        if result.returncode == 0 and result.stdout.split():
            return result.stdout.split()[0]
        raise ValueError(
            f"could not ask host {first!r} its address ('ssh {first} hostname -I' failed); "
            "pass --master_addr."
        )
    return first


def _deepspeed_alias(mode: str, env: dict[str, str]) -> dict[str, str]:
    """``env`` with the ``deepspeed`` alias directory first on ``PYTHONPATH`` when ``mode`` turns it on."""
    from deepshard.compat import ALIAS_PATH, real_deepspeed_location

    real = real_deepspeed_location()
    if mode == "off" or (mode == "auto" and real is not None):
        if real is not None:
            logger.info("'import deepspeed' in the job is the DeepSpeed installed at %s (--as_deepspeed %s)", real, mode)
        return env
    shadowed = f"; the DeepSpeed installed at {real} is not used" if real is not None else ""
    logger.info("'import deepspeed' in the job resolves to deepshard (--as_deepspeed %s)%s", mode, shadowed)
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ALIAS_PATH), env.get("PYTHONPATH", "")]))}


def build_plan(args: argparse.Namespace, env: dict[str, str]) -> Plan:
    """Turn parsed launcher flags into the commands to start here."""
    _check_script(args)
    env = _deepspeed_alias(args.as_deepspeed, env)
    resources = resolve_resources(args)
    one_node_here = args.node_rank >= 0 or args.no_ssh
    multi_node = (len(resources) > 1 or args.force_multi) and not one_node_here
    if args.elastic_training and not args.master_addr:
        raise ValueError("--elastic_training needs --master_addr, the address where the nodes meet.")
    if args.elastic_training and args.no_local_rank:
        raise ValueError("--elastic_training does not support --no_local_rank; drop one of them.")
    if one_node_here and not 0 <= args.node_rank < len(resources):
        raise ValueError(
            f"--node_rank {args.node_rank} is out of range for the {len(resources)} node(s) "
            f"({', '.join(resources)}); pass a rank in [0, {len(resources)})."
        )
    opts = NodeOptions(
        script=args.user_script,
        script_args=list(args.user_args),
        nnodes=args.max_elastic_nodes
        if args.elastic_training and args.max_elastic_nodes > 0
        else len(resources),
        master_addr=_master_addr(args, resources, multi_node),
        master_port=args.master_port,
        job_id=f"deepshard-{uuid.uuid4().hex[:12]}",
        module=args.module,
        no_python=args.no_python,
        no_local_rank=args.no_local_rank,
        log_dir=args.enable_each_rank_log,
        bind_cores_to_rank=args.bind_cores_to_rank,
        bind_core_list=args.bind_core_list,
        min_nodes=max(args.min_elastic_nodes, 1) if args.elastic_training else -1,  # -1: all nodes
        max_restarts=args.max_restarts,
        elastic=args.elastic_training,
    )
    if not multi_node:
        rank = max(args.node_rank, 0)
        return local_plan(opts, list(resources.values())[rank], rank, env)
    require_program(args.launcher)
    cwd = os.getcwd()
    env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, [cwd, env.get("PYTHONPATH", "")]))}
    exports = collect_exports(env, [os.path.expanduser("~"), cwd])
    how = RunnerArgs(args.launcher_args, args.ssh_port, args.comment, args.account)
    return MULTINODE_RUNNERS[args.launcher][1](opts, resources, exports, env, how)


def main(argv: list[str] | None = None, prog: str = "deepshard") -> int:
    """Run the launcher with ``argv`` (default: the process arguments); return the job's exit code."""
    args = build_parser(prog).parse_args(argv)
    try:
        plan = build_plan(args, dict(os.environ))
    except ValueError as err:
        logger.error("error: %s", err)
        return 2
    for label, cmd in zip(plan.labels, plan.commands):
        logger.info("%s: %s", label, shlex.join(cmd))
    return run_plan(plan)
