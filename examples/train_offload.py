"""ZeRO-Infinity example: train a GPT whose model states do not fit in RAM, with parameters and optimizer
state offloaded to NVMe (ZeRO stage 3, bf16).

    python examples/train_offload.py --nvme-path /tmp/deepshard_nvme            # the 3.1B default, 1 process
    deepshard --num_procs 2 examples/train_offload.py --nvme-path /tmp/deepshard_nvme
    torchrun --standalone --nproc_per_node 2 examples/train_offload.py ...
    # everything but the offload, on a toy shape (no disk needed):
    python examples/train_offload.py --preset tiny --offload-param none --offload-optimizer none --steps 3
    # the compute of one step of the same shape, no offload and no IO (see "Compute only" below):
    python examples/train_offload.py --compute-only

The default shape (``--preset 3b``: d_model 3072, 26 layers, 24 heads, vocab 50304, seq 64, tied
embedding) has Ψ = 3,100,176,384 parameters: 16 B/param of model states = 49.6 GB, twice the 24 GiB of
RAM of the 2-core machine this was written on. Compute per step is kept small (micro-batch 1, 64
tokens) so that a step is bound by disk IO, not by the CPU. The config is
``examples/configs/zero3_nvme.json`` (DeepSpeed's keys); ``--offload-param``, ``--offload-optimizer``,
``--nvme-path``, ``--sub-group-size``, ``--max-in-cpu`` and ``--micro-batch`` override it, and the
``aio`` section is dropped when nothing goes to NVMe.

Building the model. It is built under ``deepshard.zero.Init(config_dict_or_path=config,
remote_device=<offload_param device>, dtype=torch.bfloat16)`` with torch's default dtype set to bfloat16
for the construction, so every parameter is created, initialised and partitioned in bf16: no fp32 copy
of the model ever exists (Init computes values in the construction dtype, and keeps one module whole at
a time). Should Init refuse ``remote_device='nvme'`` (older deepshard), the script falls back to
``remote_device='cpu'`` (on a CPU machine the same RAM) and says so. With one process Init keeps every
row, so building costs 2Ψ bytes plus a transient copy of the largest parameter. Measured with
``--build-only`` on the 3b preset (5.77 GiB of bf16 parameters), 2 cores: one process, peak RSS
(ru_maxrss) 6.66 GiB, RSS after the build 6.08 GiB, 46 s; two ranks (torchrun), 3.63 GiB peak and
3.19 GiB after per rank, 58 s. ``--no-zero-init`` builds in bf16 directly instead: 6.36 GiB peak on one
process in 42 s, but the whole model on every rank.

Disk. Before anything is built the script computes what the NVMe tier needs on this node and refuses
to start (a clear message, exit status 1) if ``--nvme-path`` has less free space::

    needed = 1.05 * Ψ * (2 [bf16 params, offload_param=nvme] + 12 [fp32 master + exp_avg + exp_avg_sq,
             offload_optimizer=nvme]) * local_ranks / world

(3b preset, both offloads: 45.6 GB). If the engine also swaps the fp32 gradients to NVMe (DESIGN §3:
"write them to their tier"), that is 4 B/param more; the script prints that figure too.

Expected IO per optimizer step and process (compare with the measured figures). With N ranks, G
gradient-accumulation micro-steps, P = partitioned parameter elements on NVMe per rank
(= max(0, Ψ_part/N - max_in_cpu) with offload_param=nvme, else 0; Ψ_part excludes the parameters
under stage3_param_persistence_threshold, which stay whole in memory) and O = Ψ/N with
offload_optimizer=nvme, else 0::

    read  = G * (2 + 2) * P    # bf16 shards read in forward and again in backward
          + 12 * O             # fp32 master, exp_avg, exp_avg_sq read for the step
    write = 2 * P              # the updated bf16 shards written back after the step
          + 12 * O             # master and both Adam moments written back
    (+ 4 * O read and 4 * O written if fp32 gradients are swapped to NVMe between backward and step)

For the 3b preset on one process: read 4·3.099e9 + 12·3.100e9 = 49.6 GB (46.2 GiB), write
2·3.099e9 + 12·3.100e9 = 43.4 GB (40.4 GiB) per step; about 66 s of IO per step at the ~1.3 GiB/s
that ``benchmarks/aio_bandwidth.py`` measured on this disk, if reads and writes do not overlap. Step 1
may read less (Adam's moments do not exist yet), and the tied embedding (0.15B elements), used twice
in forward, may be read twice per pass (+0.6 GB). max_in_cpu is 0 in the config so that every
parameter goes through the disk. Checked against the engine's NVMe offload on a 152M-parameter shape
(``--d-model 1024 --layers 8 --heads 16``, 3 steps, /tmp on ext4): one process read 2.17 GiB and wrote
1.99 GiB per step against 2.27 / 1.99 expected (the 4% fewer reads: the tied embedding is not read
again at the start of backward); two ranks, 1.09 / 0.99 GiB per process against 1.13 / 0.99; step 1
read half (no Adam moments yet); the swap files took 14.0 B/param (1.99 GiB) after the first step.
Those steps were CPU-bound (0.3 GiB/s): at 152M the compute, not the disk, dominates on 2 cores.

Measured per step (rank 0's process; a tqdm bar plus one line per step): step time (forward, backward,
step), loss (mean over ranks), bytes read and written during the step from ``/proc/self/io``
(``read_bytes``/``write_bytes``: what reached the block device, valid with ``O_DIRECT``; tmpfs or
page-cache hits do not count, ``rchar``/``wchar`` are recorded as well), the achieved bandwidth (bytes /
step time, read and write separately), current and peak RSS (psutil, and ``ru_maxrss``), and the
engine's ``offload_stats()`` counters when the engine has that method. The run ends with a summary and
a JSON file (``--out``, default ``benchmarks/results/offload_<preset>.json``) holding the per-step
records, the model size, the config, the expected IO and the machine. No checkpoint is saved unless
``--save-dir`` is given (a 3B checkpoint needs another ~49 GB).

Compute only. ``--compute-only`` measures what a step costs with no offload and no IO, so that an
offloaded step's time can be compared with max(compute_s, bytes moved / disk bandwidth); it runs in one
process, without the engine. The same GPT shape is built in plain PyTorch directly in bf16 (default
dtype bf16 during construction: 2Ψ bytes of parameters, plus 2Ψ of bf16 gradients; 11.5 GiB for the 3b
preset) and forward+backward is timed on the same data, micro-batch, sequence length and
gradient-accumulation steps as the training mode, for ``--steps`` steps after one warm-up step, grads
zeroed in between (``set_to_none=False``, untimed); the median is kept. The optimizer step is timed
with ``torch.optim.AdamW(fused=True)`` (the config's hyper-parameters) on one fp32 chunk of
min(Ψ, 1e8) elements with an fp32 gradient (median of 3 steps after a warm-up step), and its
per-element time is scaled to Ψ: extrapolated, since fp32 masters and Adam state for all of Ψ
(16 B/param) do not fit in RAM. The bf16->fp32 gradient cast and the fp32->bf16 parameter cast, which
the offloaded step does too, are timed and scaled the same way. ``compute_s`` = forward+backward +
optimizer + casts; the gradient norm and clipping (``gradient_clipping``) are timed as well but left
out of it. Also reported: torch threads, RSS, peak RSS (ru_maxrss), the expected IO of the offloaded
step and the resulting bound at ``--assume-gibps``; JSON in ``--out`` (default
``benchmarks/results/offload_<preset>_compute.json``). On the 152M shape above, 3 steps, twice, with the
2 cores shared with other jobs (load average 3-5, so noisy and slower than an idle machine):
forward+backward median 7.3 / 3.4 s (single steps 2.7-8.6 s), optimizer 0.32 / 0.66 s, casts 0.35 /
0.19 s, compute_s 8.0 / 4.3 s, against 3.3 s for the expected 4.26 GiB of IO at 1.3 GiB/s.

Data: random token sequences from a fixed seed (``deepshard.testing.data.RandomTokenDataset``), a
small set repeated, so the loss falls as the model memorises it; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from typing import Any

import psutil
import torch
from tqdm import tqdm

import deepshard
from deepshard.testing.data import RandomTokenDataset
from deepshard.testing.models import GPT, GPTConfig, num_parameters

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
GIB = 2**30

SHAPES: dict[str, GPTConfig] = {
    # 3,100,176,384 parameters: 49.6 GB of model states at 16 B/param
    "3b": GPTConfig(vocab_size=50304, seq_len=64, d_model=3072, n_layers=26, n_heads=24),
    # 1,110,323,200 parameters: 17.8 GB of model states, under the 24 GiB of RAM: a cpu-offload comparison
    "1b": GPTConfig(vocab_size=50304, seq_len=64, d_model=2048, n_layers=20, n_heads=16),
    # ~0.1M parameters: checks everything but the disk in seconds
    "tiny": GPTConfig(vocab_size=256, seq_len=32, d_model=64, n_layers=2, n_heads=4),
}
PARAM_BYTES = 2  # bf16 parameter shard
OPTIM_BYTES = 12  # fp32 master + exp_avg + exp_avg_sq
GRAD_BYTES = 4  # fp32 gradient shard, if the engine swaps it too
SLACK = 1.05
DEVICES = ("nvme", "cpu", "none")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    shape = parser.add_argument_group("model shape (flags override the preset)")
    shape.add_argument("--preset", default="3b", choices=sorted(SHAPES), help="model shape (default: 3b)")
    shape.add_argument("--d-model", type=int, default=None)
    shape.add_argument("--layers", type=int, default=None)
    shape.add_argument("--heads", type=int, default=None)
    shape.add_argument("--vocab", type=int, default=None)
    shape.add_argument("--seq-len", type=int, default=None)
    run = parser.add_argument_group("run")
    run.add_argument("--micro-batch", type=int, default=1, help="train_micro_batch_size_per_gpu (default 1)")
    run.add_argument("--steps", type=int, default=5, help="optimizer steps to run")
    run.add_argument("--seed", type=int, default=1234)
    run.add_argument("--samples", type=int, default=64, help="size of the synthetic dataset (repeated)")
    run.add_argument(
        "--compute-only",
        action="store_true",
        help="time one step's compute (plain bf16 PyTorch, no offload, no IO) and stop; see the docstring",
    )
    offload = parser.add_argument_group("offload (override the config)")
    offload.add_argument("--offload-param", choices=DEVICES, default="nvme", help="offload_param.device")
    offload.add_argument(
        "--offload-optimizer", choices=DEVICES, default="nvme", help="offload_optimizer.device"
    )
    offload.add_argument(
        "--nvme-path", default=None, help="nvme_path of both offloads (default: the config's)"
    )
    offload.add_argument("--sub-group-size", type=int, default=None, help="zero_optimization.sub_group_size")
    offload.add_argument("--max-in-cpu", type=int, default=None, help="offload_param.max_in_cpu")
    offload.add_argument(
        "--assume-gibps", type=float, default=1.3, help="disk bandwidth for the expected step time (GiB/s)"
    )
    out = parser.add_argument_group("output")
    out.add_argument(
        "--out", default=None, help="JSON results (default benchmarks/results/offload_<preset>.json)"
    )
    out.add_argument("--save-dir", default=None, help="save a checkpoint here at the end (default: none)")
    out.add_argument(
        "--no-zero-init", action="store_true", help="build in bf16 directly, not under zero.Init"
    )
    out.add_argument("--build-only", action="store_true", help="build the model, report its memory, and stop")
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the launcher")
    deepshard.add_config_arguments(parser)
    args = parser.parse_args()
    if args.deepspeed_config is None:
        args.deepspeed_config = os.path.join(HERE, "configs", "zero3_nvme.json")
    return args


def forever(loader: Any) -> Iterator[Any]:
    """The loader's batches, epoch after epoch (the synthetic dataset is small and repeated)."""
    while True:
        yield from loader


# ---------------------------------------------------------------------- model and config
def model_shape(args: argparse.Namespace) -> tuple[GPTConfig, str]:
    """The GPT shape from the preset and the flags, and a tag naming it (the preset, or "custom" when a flag changed it)."""
    base = SHAPES[args.preset]
    overrides = {
        "d_model": args.d_model,
        "n_layers": args.layers,
        "n_heads": args.heads,
        "vocab_size": args.vocab,
        "seq_len": args.seq_len,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None and v != getattr(base, k)}
    cfg = replace(base, **overrides)
    if cfg.d_model % cfg.n_heads:
        raise SystemExit(f"--d-model {cfg.d_model} is not a multiple of --heads {cfg.n_heads}")
    return cfg, args.preset if not overrides else "custom"


def count_parameters(cfg: GPTConfig, threshold: int) -> dict[str, int]:
    """Parameter counts of a meta-device model (no memory): total, partitioned, largest tensor."""
    with torch.device("meta"):
        model = GPT(cfg)
    sizes = [p.numel() for p in model.parameters()]
    return {
        "total": num_parameters(model),
        "partitioned": sum(n for n in sizes if n >= threshold),
        "largest": max(sizes),
    }


def ds_config(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON config with the flags applied."""
    with open(args.deepspeed_config) as fh:
        cfg: dict[str, Any] = json.load(fh)
    cfg = copy.deepcopy(cfg)
    cfg.pop("train_batch_size", None)
    cfg["train_micro_batch_size_per_gpu"] = args.micro_batch
    zero = cfg.setdefault("zero_optimization", {})
    zero["stage"] = 3
    cfg.setdefault("bf16", {})["enabled"] = True
    cfg.setdefault("fp16", {})["enabled"] = False
    for key, device in (("offload_param", args.offload_param), ("offload_optimizer", args.offload_optimizer)):
        section = zero.setdefault(key, {})
        section["device"] = device
        if args.nvme_path is not None:
            section["nvme_path"] = args.nvme_path
        if device == "nvme" and not section.get("nvme_path"):
            raise SystemExit(f"zero_optimization.{key}.device is nvme but no nvme_path: pass --nvme-path DIR")
    if args.max_in_cpu is not None:
        zero["offload_param"]["max_in_cpu"] = args.max_in_cpu
    if args.sub_group_size is not None:
        zero["sub_group_size"] = args.sub_group_size
    if "nvme" not in (args.offload_param, args.offload_optimizer):
        cfg.pop("aio", None)  # NVMe IO settings; nothing goes to NVMe
    return cfg


def nvme_paths(cfg: dict[str, Any]) -> dict[str, list[str]]:
    """Directory -> the offloads (``param``, ``optimizer``) that put files there."""
    zero = cfg["zero_optimization"]
    paths: dict[str, list[str]] = {}
    for key in ("offload_param", "offload_optimizer"):
        section = zero.get(key) or {}
        if section.get("device") == "nvme":
            paths.setdefault(os.path.abspath(section["nvme_path"]), []).append(key.removeprefix("offload_"))
    return paths


def disk_requirement(n: dict[str, int], cfg: dict[str, Any], world: int, local_world: int) -> dict[str, Any]:
    """Bytes the NVMe tier needs on this node, per directory, with and without swapped gradients."""
    node_share = local_world / world  # this node's ranks hold this fraction of every shard
    dirs = {}
    for path, kinds in nvme_paths(cfg).items():
        states = (PARAM_BYTES if "param" in kinds else 0) + (OPTIM_BYTES if "optimizer" in kinds else 0)
        grads = GRAD_BYTES if "optimizer" in kinds else 0
        dirs[path] = {
            "offloads": kinds,
            "bytes_per_param": states,
            "needed_bytes": math.ceil(SLACK * n["total"] * states * node_share),
            "needed_with_grads_bytes": math.ceil(SLACK * n["total"] * (states + grads) * node_share),
        }
    return dirs


def check_disk(dirs: dict[str, dict[str, Any]], rank: int) -> str | None:
    """Print the requirement; return the refusal message when a directory is short of space."""
    if not dirs:
        if rank == 0:
            print("disk: nothing goes to NVMe (no offload device is nvme), no space needed")
        return None
    problem = None
    for path, need in dirs.items():
        os.makedirs(path, exist_ok=True)
        usage = shutil.disk_usage(path)
        need["free_bytes"] = usage.free
        need["total_bytes"] = usage.total
        line = (
            f"disk: {path} holds {'+'.join(need['offloads'])} ({need['bytes_per_param']} B/param x params x "
            f"local ranks/world, +{SLACK - 1:.0%} slack): needs {need['needed_bytes'] / 1e9:.2f} GB "
            f"({gb(need['needed_bytes'])}), {need['needed_with_grads_bytes'] / 1e9:.2f} GB if fp32 "
            f"gradients are swapped too; free {usage.free / 1e9:.1f} GB ({gb(usage.free)})"
        )
        if rank == 0:
            print(line)
        if usage.free < need["needed_bytes"]:
            problem = (
                f"not enough disk space for the NVMe tier at {path}: the model states offloaded there "
                f"({'+'.join(need['offloads'])}) need {need['needed_bytes'] / 1e9:.1f} GB "
                f"({gb(need['needed_bytes'])}) but only {usage.free / 1e9:.1f} GB ({gb(usage.free)}) is free. Point --nvme-path at a larger disk, free space "
                "there, or pick a smaller model (--preset, --layers, --d-model)."
            )
    return problem


def expected_io(n: dict[str, int], cfg: dict[str, Any], world: int) -> dict[str, Any]:
    """Bytes one process should read and write per optimizer step (see the module docstring)."""
    zero = cfg["zero_optimization"]
    accum = int(cfg.get("gradient_accumulation_steps") or 1)
    p_elems = 0.0
    if zero["offload_param"]["device"] == "nvme":
        max_in_cpu = int(zero["offload_param"].get("max_in_cpu", 1_000_000_000))
        p_elems = max(0.0, n["partitioned"] / world - max_in_cpu)
    o_elems = n["total"] / world if zero["offload_optimizer"]["device"] == "nvme" else 0.0
    read = accum * 2 * PARAM_BYTES * p_elems + OPTIM_BYTES * o_elems
    write = PARAM_BYTES * p_elems + OPTIM_BYTES * o_elems
    return {
        "formula": "read = G*(2+2)*P + 12*O; write = 2*P + 12*O (+4*O each if fp32 grads are swapped)",
        "gradient_accumulation_steps": accum,
        "P_param_elements_on_nvme": int(p_elems),
        "O_optimizer_elements_on_nvme": int(o_elems),
        "read_bytes": int(read),
        "write_bytes": int(write),
        "read_bytes_with_grads": int(read + GRAD_BYTES * o_elems),
        "write_bytes_with_grads": int(write + GRAD_BYTES * o_elems),
    }


def build_model(
    cfg: GPTConfig, config: dict[str, Any], args: argparse.Namespace, rank: int
) -> tuple[torch.nn.Module, str]:
    """The GPT in bf16, partitioned while it is built (zero.Init), never holding an fp32 copy."""
    from deepshard.config.errors import NotSupportedYetError
    from deepshard.zero import Init

    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # construct (and initialise) every tensor in bf16
    try:
        if args.no_zero_init:
            return GPT(cfg), "bf16 directly (--no-zero-init)"
        param = config["zero_optimization"]["offload_param"]
        remote = param["device"]
        kwargs = {
            "config_dict_or_path": config,
            "dtype": torch.bfloat16,
            "pin_memory": param.get("pin_memory", False),
        }
        try:
            init = Init(remote_device=remote, **kwargs)
        except NotSupportedYetError as exc:
            if remote != "nvme":
                raise
            if rank == 0:
                print(f"zero.Init(remote_device='nvme') refused ({exc}); building with remote_device='cpu'")
            remote = "cpu"
            init = Init(remote_device=remote, **kwargs)
        with init:
            model = GPT(cfg)
        return model, f"zero.Init(remote_device={remote!r}, dtype=bfloat16)"
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------------------- measurements
def proc_io() -> dict[str, int]:
    """This process's IO counters (all threads): block-device bytes and syscall bytes."""
    try:
        with open("/proc/self/io") as fh:
            fields = dict(line.split(": ") for line in fh.read().splitlines())
        return {k: int(fields[k]) for k in ("read_bytes", "write_bytes", "rchar", "wchar")}
    except (OSError, KeyError, ValueError):
        c = psutil.Process().io_counters()
        return {"read_bytes": c.read_bytes, "write_bytes": c.write_bytes, "rchar": 0, "wchar": 0}


def ru_maxrss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def offload_stats(engine: Any) -> dict[str, Any] | None:
    """The engine's ``offload_stats()`` when it has one (numbers only, for JSON)."""
    method = getattr(engine, "offload_stats", None)
    if not callable(method):
        return None
    stats = method()
    if not isinstance(stats, dict):
        return None
    return {str(k): v for k, v in stats.items() if isinstance(v, int | float | str | bool)}


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", ROOT, "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine(dirs: dict[str, Any]) -> dict[str, Any]:
    fs = {}
    for path in dirs:
        best = max(
            (p for p in psutil.disk_partitions(all=True) if path.startswith(p.mountpoint)),
            key=lambda p: len(p.mountpoint),
            default=None,
        )
        fs[path] = (
            None
            if best is None
            else {"device": best.device, "mountpoint": best.mountpoint, "fstype": best.fstype}
        )
    return {
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": cpu_model(),
        "ram_total_bytes": psutil.virtual_memory().total,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepshard": deepshard.__version__,
        "git_commit": git_commit(),
        "nvme_filesystems": fs,
    }


def gb(nbytes: float) -> str:
    """Bytes in GiB, or MiB below 0.1 GiB."""
    return f"{nbytes / GIB:.2f} GiB" if abs(nbytes) >= 0.1 * GIB else f"{nbytes / 2**20:.1f} MiB"


def files_bytes(paths: Any) -> int:
    """Disk space taken by the files under the NVMe directories (allocated blocks)."""
    total = 0
    for root in paths:
        for folder, _, names in os.walk(root):
            for name in names:
                with contextlib.suppress(OSError):  # removed while we looked
                    total += os.lstat(os.path.join(folder, name)).st_blocks * 512
    return total


# ---------------------------------------------------------------------- --compute-only
CHUNK = 100_000_000  # elements of the fp32 chunk the optimizer and the casts are timed on
CHUNK_STEPS = 3  # timed repetitions on the chunk, after one warm-up


def time_chunk(fn: Any, repeats: int = CHUNK_STEPS) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def compute_only(args: argparse.Namespace) -> None:
    """Time the compute of one training step with no offload and no IO; see the module docstring."""
    from deepshard.runtime.dataloader import DeepShardDataLoader

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit("--compute-only measures one process: run it without a launcher")
    shape, tag = model_shape(args)
    config = ds_config(args)
    threshold = int(config["zero_optimization"].get("stage3_param_persistence_threshold", 100_000))
    n = count_parameters(shape, threshold)
    psi = n["total"]
    accum = int(config.get("gradient_accumulation_steps") or 1)
    hyper = dict((config.get("optimizer") or {}).get("params") or {})
    adam = {
        "lr": float(hyper.get("lr", 1e-3)),
        "betas": tuple(float(b) for b in hyper.get("betas", (0.9, 0.999))),
        "eps": float(hyper.get("eps", 1e-8)),
        "weight_decay": float(hyper.get("weight_decay", 0.01)),
    }
    threads = torch.get_num_threads()
    load_before = os.getloadavg()
    print(
        f"compute-only: {psi:,} parameters (d_model {shape.d_model}, {shape.n_layers} layers, {shape.n_heads} "
        f"heads, vocab {shape.vocab_size}, seq {shape.seq_len}), micro-batch {args.micro_batch} x {accum} "
        f"micro-steps, {threads} torch threads, load average {load_before[0]:.2f}"
    )

    # -- forward + backward of the bf16 model, built in bf16 (no fp32 copy)
    torch.manual_seed(args.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    t0 = time.perf_counter()
    try:
        model = GPT(shape)
    finally:
        torch.set_default_dtype(previous)
    build_s = time.perf_counter() - t0
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    model.train()
    rss_built = psutil.Process().memory_info().rss
    print(f"built in bf16 in {build_s:.1f}s: RSS {gb(rss_built)} (the bf16 parameters are {gb(2 * psi)})")
    dataset = RandomTokenDataset(shape.vocab_size, shape.seq_len, size=args.samples, seed=args.seed)
    loader = DeepShardDataLoader(dataset, batch_size=args.micro_batch, rank=0, world_size=1)
    batches = forever(loader)
    records: list[dict[str, Any]] = []
    for step in range(args.steps + 1):  # step 0: warm-up (allocates the gradients), not counted
        fwd = bwd = 0.0
        losses = []
        for _ in range(accum):
            x, y = next(batches)
            t = time.perf_counter()
            loss = model(x, y)
            fwd += time.perf_counter() - t
            t = time.perf_counter()
            (loss / accum).backward()
            bwd += time.perf_counter() - t
            losses.append(float(loss.detach()))
        t = time.perf_counter()
        model.zero_grad(set_to_none=False)
        zero_s = time.perf_counter() - t
        rec = {
            "step": step,
            "warmup": step == 0,
            "loss": sum(losses) / len(losses),
            "forward_s": fwd,
            "backward_s": bwd,
            "forward_backward_s": fwd + bwd,
            "zero_grad_s": zero_s,
            "rss_bytes": psutil.Process().memory_info().rss,
        }
        records.append(rec)
        print(
            f"{'warm-up' if step == 0 else f'step {step:>3}'} | loss {rec['loss']:.4f} | forward+backward "
            f"{fwd + bwd:7.3f}s (fwd {fwd:.3f} bwd {bwd:.3f}; zero_grad {zero_s:.3f} untimed) | RSS {gb(rec['rss_bytes'])}"
        )
    timed = [r["forward_backward_s"] for r in records[1:]]
    fwd_bwd_s = statistics.median(timed) if timed else float("nan")
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    peak_model = ru_maxrss()
    del model, loss
    # -- the optimizer step and the casts, timed on one fp32 chunk and scaled to psi elements
    m = min(psi, CHUNK)
    gen = torch.Generator().manual_seed(args.seed)
    master = torch.randn(m, generator=gen).mul_(0.02)
    master.grad = torch.randn(m, generator=gen).mul_(1e-3)
    half = master.grad.to(torch.bfloat16)  # a bf16 gradient to cast up, then the bf16 parameter cast to
    optim = torch.optim.AdamW([master], fused=True, **adam)  # type: ignore[arg-type]
    optim_times = time_chunk(optim.step)  # the warm-up step allocates exp_avg and exp_avg_sq
    up_times = time_chunk(lambda: master.grad.copy_(half))  # type: ignore[union-attr]
    down_times = time_chunk(lambda: half.copy_(master))
    clip = float(config.get("gradient_clipping") or 0.0)

    def norm_and_clip() -> None:
        norm = torch.linalg.vector_norm(master.grad)
        master.grad.mul_(torch.clamp(clip / (norm + 1e-6), max=1.0))  # type: ignore[union-attr]

    clip_times = time_chunk(norm_and_clip) if clip > 0 else []
    scale = psi / m

    def scaled(times: list[float]) -> float:
        return statistics.median(times) * scale if times else 0.0

    optimizer_s, up_s, down_s, clip_s = (scaled(t) for t in (optim_times, up_times, down_times, clip_times))
    compute_s = fwd_bwd_s + optimizer_s + up_s + down_s
    peak = ru_maxrss()
    load_after = os.getloadavg()

    # -- the disk bound this compute time is meant to be compared with
    expect = expected_io(n, config, 1)
    io_bytes = expect["read_bytes"] + expect["write_bytes"]
    io_s = io_bytes / (args.assume_gibps * GIB)
    print(
        f"optimizer: fused AdamW (torch.optim.AdamW(fused=True), fp32) on one chunk of {m:,} elements, median of "
        f"{CHUNK_STEPS} steps after a warm-up {statistics.median(optim_times):.3f}s, x {scale:.2f} to {psi:,} "
        f"elements = {optimizer_s:.2f}s "
        + (
            f"(extrapolated: fp32 masters + Adam state for all of them, 16 B/param = {gb(16 * psi)}, are not allocated)"
            if m < psi
            else "(the whole model in one chunk: measured, not extrapolated)"
        )
    )
    print(
        f"casts, same way: bf16->fp32 gradients {up_s:.2f}s, fp32->bf16 parameters {down_s:.2f}s"
        + (f"; gradient norm + clip ({clip}) {clip_s:.2f}s, not in compute_s" if clip_times else "")
    )
    print(
        f"summary: forward+backward median {fwd_bwd_s:.3f}s over {len(timed)} steps "
        f"({', '.join(f'{t:.3f}' for t in timed)}) + optimizer {optimizer_s:.2f}s + casts {up_s + down_s:.2f}s = "
        f"compute_s {compute_s:.2f}s per step | {threads} threads | peak RSS {gb(peak)} (ru_maxrss; "
        f"{gb(peak_model)} by the end of forward/backward) | load average {load_before[0]:.2f} -> {load_after[0]:.2f}"
    )
    print(
        f"compare an offloaded step with max(compute_s, IO / bandwidth) = max({compute_s:.2f}, "
        f"{gb(io_bytes)} / {args.assume_gibps} GiB/s = {io_s:.2f}) = {max(compute_s, io_s):.2f}s "
        f"(one process, offload param={args.offload_param} optimizer={args.offload_optimizer})"
    )
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"offload_{tag}_compute.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    result = {
        "mode": "compute-only",
        "model": {"shape": asdict(shape), "tag": tag, "parameters": psi, "dtype": "bfloat16"},
        "micro_batch": args.micro_batch,
        "gradient_accumulation_steps": accum,
        "steps": args.steps,
        "threads": threads,
        "build_s": build_s,
        "bf16_grad_bytes": grads,
        "records": records,
        "forward_backward_median_s": fwd_bwd_s,
        "optimizer": {
            "how": "torch.optim.AdamW(fused=True) on one fp32 chunk, per-element time scaled to the parameters",
            "hyper": adam,
            "chunk_elements": m,
            "scale": scale,
            "extrapolated": m < psi,
            "chunk_step_s": optim_times,
            "chunk_bf16_to_fp32_grad_s": up_times,
            "chunk_fp32_to_bf16_param_s": down_times,
            "chunk_grad_norm_clip_s": clip_times,
        },
        "optimizer_s": optimizer_s,
        "cast_grad_bf16_to_fp32_s": up_s,
        "cast_param_fp32_to_bf16_s": down_s,
        "grad_norm_clip_s": clip_s,
        "compute_s": compute_s,
        "compute_s_formula": "forward_backward_median_s + optimizer_s + cast_grad_bf16_to_fp32_s + cast_param_fp32_to_bf16_s",
        "expected_io_per_step": expect,
        "assume_gibps": args.assume_gibps,
        "io_s_at_assumed_bandwidth": io_s,
        "bound_s": max(compute_s, io_s),
        "rss_after_build_bytes": rss_built,
        "ru_maxrss_after_forward_backward_bytes": peak_model,
        "ru_maxrss_bytes": peak,
        "load_average_before_after": [load_before[0], load_after[0]],
        "machine": machine({}),
        "command": sys.argv,
    }
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"results: {out}")


# ---------------------------------------------------------------------- main
def main() -> None:
    args = parse_args()
    if args.compute_only:
        compute_only(args)
        return
    deepshard.init_distributed(verbose=False)
    comm = deepshard.comm
    rank, world = comm.get_rank(), comm.get_world_size()
    local_world = comm.get_local_world_size() if comm.is_initialized() else 1
    shape, tag = model_shape(args)
    config = ds_config(args)
    threshold = int(config["zero_optimization"].get("stage3_param_persistence_threshold", 100_000))

    # -- sizes, disk and expected IO, before anything is built
    n = count_parameters(shape, threshold)
    states = 16 * n["total"]
    if rank == 0:
        print(
            f"model: {n['total']:,} parameters (d_model {shape.d_model}, {shape.n_layers} layers, {shape.n_heads} heads, "
            f"vocab {shape.vocab_size}, seq {shape.seq_len}); model states at 16 B/param: {states / 1e9:.1f} GB "
            f"({gb(states)}), RAM {gb(psutil.virtual_memory().total)} | world {world} | offload param="
            f"{args.offload_param} optimizer={args.offload_optimizer}"
        )
    dirs = disk_requirement(n, config, world, local_world)
    problem = check_disk(dirs, rank)
    failed = torch.tensor([0 if problem is None else 1])
    comm.all_reduce(failed, op=comm.ReduceOp.MAX)  # every rank stops if any rank is short of space
    if int(failed):
        if comm.is_initialized():
            comm.destroy_process_group()
        raise SystemExit(problem or "another rank's NVMe path is short of space; see its message")
    expect = expected_io(n, config, world)
    if rank == 0:
        secs = (expect["read_bytes"] + expect["write_bytes"]) / (args.assume_gibps * GIB)
        print(
            f"expected IO per step and process: read {gb(expect['read_bytes'])}, write {gb(expect['write_bytes'])} "
            f"(with fp32 grads swapped: {gb(expect['read_bytes_with_grads'])} / {gb(expect['write_bytes_with_grads'])}); "
            f"{secs:.1f} s at {args.assume_gibps} GiB/s if not overlapped  [{expect['formula']}]"
        )
        zero = config["zero_optimization"]
        buffer = int(zero["offload_param"].get("buffer_size", 100_000_000))
        if args.offload_param == "nvme" and buffer < math.ceil(n["largest"] / world):
            print(
                f"warning: offload_param.buffer_size {buffer:,} < the largest parameter shard "
                f"{math.ceil(n['largest'] / world):,} elements (DeepSpeed requires it to fit)"
            )
    try:  # fail fast on a config deepshard refuses (until offload lands: any device but 'none')
        from deepshard.config import ConfigError, load_config

        load_config(config, dp_world_size=world)
    except ConfigError as exc:
        raise SystemExit(f"deepshard refuses this config: {exc}") from None

    # -- build
    rss0 = psutil.Process().memory_info().rss
    t0 = time.perf_counter()
    model, how = build_model(shape, config, args, rank)
    build = {
        "how": how,
        "seconds": time.perf_counter() - t0,
        "rss_before_bytes": rss0,
        "rss_after_bytes": psutil.Process().memory_info().rss,
        "ru_maxrss_bytes": ru_maxrss(),
    }
    if rank == 0:
        print(
            f"built with {how} in {build['seconds']:.1f}s: RSS {gb(build['rss_before_bytes'])} -> "
            f"{gb(build['rss_after_bytes'])}, peak {gb(build['ru_maxrss_bytes'])} "
            f"(the bf16 model is {gb(2 * n['total'])}, {gb(2 * n['total'] / world)} per rank)"
        )
    if args.build_only:
        return

    dataset = RandomTokenDataset(shape.vocab_size, shape.seq_len, size=args.samples, seed=args.seed)
    t0 = time.perf_counter()
    engine, _, loader, _ = deepshard.initialize(
        model=model, model_parameters=model.parameters(), training_data=dataset, config=config
    )
    assert loader is not None
    setup = {
        "seconds": time.perf_counter() - t0,
        "rss_bytes": psutil.Process().memory_info().rss,
        "ru_maxrss_bytes": ru_maxrss(),
        "nvme_files_bytes": files_bytes(dirs),
    }
    if rank == 0:
        if dirs:
            print(f"files under the NVMe path(s) after setup: {gb(setup['nvme_files_bytes'])}")
        print(
            f"engine ready in {setup['seconds']:.1f}s: RSS {gb(setup['rss_bytes'])}, peak {gb(setup['ru_maxrss_bytes'])}"
        )

    # -- train
    records: list[dict[str, Any]] = []
    batches = forever(loader)
    peak_psutil = psutil.Process().memory_info().rss
    bar = tqdm(
        total=args.steps, disable=rank != 0, desc=f"offload {tag} x{world}", unit="step", mininterval=0.0
    )
    stats_before = offload_stats(engine)
    while engine.global_steps < args.steps:
        io0, t_start = proc_io(), time.perf_counter()
        times = {"forward_s": 0.0, "backward_s": 0.0, "step_s": 0.0}
        micro_loss, micro = torch.zeros(()), 0
        while True:  # the micro-steps of one optimizer step
            x, y = next(batches)
            boundary = engine.is_gradient_accumulation_boundary()
            t = time.perf_counter()
            loss = engine(x.to(engine.device), y.to(engine.device))
            times["forward_s"] += time.perf_counter() - t
            t = time.perf_counter()
            engine.backward(loss)
            times["backward_s"] += time.perf_counter() - t
            t = time.perf_counter()
            engine.step()
            times["step_s"] += time.perf_counter() - t
            micro_loss += loss.detach().float().cpu()
            micro += 1
            if boundary:
                break
        elapsed = time.perf_counter() - t_start
        io1 = proc_io()
        mean = micro_loss / micro
        comm.all_reduce(mean)
        rss = psutil.Process().memory_info().rss
        peak_psutil = max(peak_psutil, rss)
        read, write = io1["read_bytes"] - io0["read_bytes"], io1["write_bytes"] - io0["write_bytes"]
        rec: dict[str, Any] = {
            "step": engine.global_steps,
            "loss": float(mean) / world,
            "time_s": elapsed,
            **times,
            "read_bytes": read,
            "write_bytes": write,
            "rchar": io1["rchar"] - io0["rchar"],
            "wchar": io1["wchar"] - io0["wchar"],
            "read_gibps": read / elapsed / GIB,
            "write_gibps": write / elapsed / GIB,
            "rss_bytes": rss,
            "peak_rss_psutil_bytes": peak_psutil,
            "ru_maxrss_bytes": ru_maxrss(),
        }
        stats = offload_stats(engine)
        post = {
            "loss": f"{rec['loss']:.4f}",
            "s/step": f"{elapsed:.2f}",
            "rd": f"{read / GIB:.2f}G@{rec['read_gibps']:.2f}",
            "wr": f"{write / GIB:.2f}G@{rec['write_gibps']:.2f}",
            "peak": f"{rec['ru_maxrss_bytes'] / GIB:.1f}G",
        }
        if stats is not None:
            rec["offload_stats"] = stats
            for key, short in (("bytes_read", "eng_rd"), ("bytes_written", "eng_wr")):
                if isinstance(stats.get(key), int | float):
                    delta = stats[key] - ((stats_before or {}).get(key) or 0)
                    rec[f"offload_stats_{key}_delta"] = delta
                    post[short] = gb(delta)
            stats_before = stats
        records.append(rec)
        if rank == 0:
            extra = "".join(f" {k} {v}" for k, v in post.items() if k.startswith("eng_"))
            bar.write(
                f"step {rec['step']:>3} | loss {rec['loss']:.4f} | {elapsed:7.2f}s (fwd {times['forward_s']:.2f} "
                f"bwd {times['backward_s']:.2f} step {times['step_s']:.2f}) | read {gb(read)} {rec['read_gibps']:.2f} GiB/s "
                f"| write {gb(write)} {rec['write_gibps']:.2f} GiB/s | RSS {gb(rss)} peak {gb(peak_psutil)} "
                f"(ru_maxrss {gb(rec['ru_maxrss_bytes'])}){extra}"
            )
            bar.set_postfix(post)
            bar.update(1)
    bar.close()
    nvme_after = files_bytes(dirs)

    # -- per-rank totals, gathered to rank 0
    row = torch.tensor(
        [
            sum(r["read_bytes"] for r in records),
            sum(r["write_bytes"] for r in records),
            sum(r["time_s"] for r in records),
            ru_maxrss(),
        ],
        dtype=torch.float64,
    )
    rows = [torch.zeros_like(row) for _ in range(world)]
    if comm.is_initialized():
        comm.all_gather(rows, row)
    else:
        rows = [row]
    checkpoint = engine.save_checkpoint(args.save_dir) if args.save_dir else None
    if rank != 0:
        return

    steady = records[1:] or records  # step 1 also creates the optimizer state
    mean_time = sum(r["time_s"] for r in steady) / len(steady)
    mean_read = sum(r["read_bytes"] for r in steady) / len(steady)
    mean_write = sum(r["write_bytes"] for r in steady) / len(steady)
    print(f"\n{'rank':>4} {'read':>12} {'written':>12} {'time s':>9} {'peak RSS':>10}")
    for r, vals in enumerate(rows):
        rd, wr, secs, peak = vals.tolist()
        print(f"{r:>4} {gb(rd):>12} {gb(wr):>12} {secs:>9.1f} {gb(peak):>10}")
    print(
        f"summary: {n['total']:,} parameters, world {world}, {len(records)} steps; steps 2+ (or all): "
        f"{mean_time:.2f} s/step, read {gb(mean_read)} ({mean_read / mean_time / GIB:.2f} GiB/s) vs expected "
        f"{gb(expect['read_bytes'])}, write {gb(mean_write)} ({mean_write / mean_time / GIB:.2f} GiB/s) vs expected "
        f"{gb(expect['write_bytes'])}; loss {records[0]['loss']:.4f} -> {records[-1]['loss']:.4f}; peak RSS "
        f"{gb(max(v[3] for v in (x.tolist() for x in rows)))} (RAM {gb(psutil.virtual_memory().total)})"
        + (f"; checkpoint {checkpoint}" if checkpoint else "")
    )
    if dirs:
        print(
            f"files under the NVMe path(s): {gb(setup['nvme_files_bytes'])} after setup, {gb(nvme_after)} at the end"
        )
    expected_total = expect["read_bytes"] + expect["write_bytes"]
    if expected_total > 0 and mean_read + mean_write < 0.1 * expected_total:
        print(
            f"warning: this process moved {gb(mean_read + mean_write)} per step to and from the disk, under 10% of the "
            f"{gb(expected_total)} expected: the engine is not offloading to NVMe, or its IO goes through the page "
            "cache (no O_DIRECT: tmpfs, overlayfs) where /proc/self/io does not see it (see rchar/wchar in the JSON)"
        )
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"offload_{tag}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    result = {
        "model": {
            "shape": asdict(shape),
            "tag": tag,
            "parameters": n["total"],
            "partitioned_parameters": n["partitioned"],
            "model_states_bytes_16B_per_param": states,
        },
        "world_size": world,
        "steps": args.steps,
        "config": config,
        "disk": dirs,
        "expected_io_per_step_per_process": expect,
        "build": build,
        "engine_setup": setup,
        "nvme_files_bytes_at_end": nvme_after,
        "records_rank0": records,
        "per_rank_totals": [
            dict(zip(("read_bytes", "write_bytes", "time_s", "ru_maxrss_bytes"), v.tolist(), strict=True))
            for v in rows
        ],
        "machine": machine(dirs),
        "command": sys.argv,
    }
    with open(out, "w") as fh:
        json.dump(result, fh, indent=1)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
