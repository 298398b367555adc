"""Data-parallel throughput and memory: deepshard vs torch DDP / FSDP2 vs DeepSpeed, in one run.

Each contender trains the benchmark GPT (``--preset small``: 6 layers, d_model 512, vocab 8192, seq 128,
~23M parameters; ``--preset medium``: GPT-2 small's shape, ~124M) with micro-batch 4 on 2 ranks over gloo, one thread per rank. Every job is a
fresh ``torchrun --standalone --nproc_per_node 2`` of ``_worker.py``; the contenders alternate
(A B C A B C ...) so that the machine's drift hits all of them alike, and what is reported is the
median over rounds of the *per-round* ratios deepshard / peer. While a job runs this driver samples
the resident set size of every rank from outside (psutil, every 0.2 s) and keeps each rank's peak.

    python benchmarks/bench_dp.py                     # fp32 and bf16, 5 rounds, 10 warmup + 20 timed steps
    python benchmarks/bench_dp.py --quick             # smoke run: 1 round, 2 warmup + 3 timed steps
    python benchmarks/bench_dp.py --stage 2 --preset medium   # ZeRO-2 (deepshard and DeepSpeed) vs DDP
    python benchmarks/bench_dp.py --stage 3           # ZeRO-3: deepshard vs FSDP2 vs DeepSpeed stage 3
    python benchmarks/bench_dp.py --stage 3 --with-ddp             # ... and DDP as a non-sharded reference
    python benchmarks/bench_dp.py --stage 3 --quick --impls fsdp2,deepspeed   # only some contenders
    python benchmarks/bench_dp.py --stage 2 --offload-optimizer cpu --preset medium      # ZeRO-Offload
    python benchmarks/bench_dp.py --stage 3 --offload-optimizer nvme --offload-param nvme \
        --dtypes bf16 --preset medium --nvme-dir /tmp/bench_dp_nvme                      # ZeRO-Infinity
    python benchmarks/bench_dp.py --stage 3 --offload-param nvme --dry-run   # print the ds_configs only

Contenders (``--impls`` picks any subset, in launch order): at stages 0, 1 and 2 (or without
``--stage``) deepshard, DDP and DeepSpeed, with DDP and DeepSpeed as the peers deepshard is compared
with. At ``--stage 3`` deepshard, FSDP2 (``torch.distributed.fsdp.fully_shard`` per transformer
block and on the root; bf16 as ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)``
over fp32 sharded parameters) and DeepSpeed ZeRO-3, with FSDP2 and DeepSpeed as the peers; DDP joins
only with ``--with-ddp`` (its ratio is reported, but it is never the "faster peer" at stage 3, being
no ZeRO-3 peer). deepshard and DeepSpeed share one ds_config (``--stage`` sets
``zero_optimization.stage``, ``--extra-config`` merges more into it); DDP and FSDP2 do not read it.

DeepSpeed is optional: without it (``DS_BUILD_OPS=0 pip install deepspeed``) the driver says so and
compares with the other peers only. Its first run JIT-compiles its CPU fused Adam (minutes); the driver runs one
untimed DeepSpeed job first so that no timed job pays for it, and deletes the shared-memory segments
(``/dev/shm/deepspeed_allreduce_buffer_*``) that DeepSpeed's CPU communication leaves behind.
Results: ``docs/benchmarks.md``.

Offload (``benchmarks/offload_matrix.sh`` runs both configurations below, deepshard vs DeepSpeed).
``--offload-optimizer cpu|nvme`` and ``--offload-param cpu|nvme`` write
``zero_optimization.offload_optimizer`` / ``offload_param`` into the shared ds_config (``--extra-config``
is merged over them, so any value below can be overridden); with either one the default contenders
are deepshard and DeepSpeed only (DDP and FSDP2 do not offload; ``--impls`` / ``--with-ddp`` add them).
``--dry-run`` prints the ds_config each contender would be built with (from the worker itself, so it is
what a job gets) and whether ``deepshard.config.load_config`` accepts it, and runs nothing.

* ``offload_optimizer: {"device": "cpu"}`` (stages 1-3): DeepSpeed steps with its ``DeepSpeedCPUAdam``
  (the ``cpu_adam`` op, JIT-built on first use; the untimed DeepSpeed job runs the timed jobs' config,
  so it builds every op they load: ``cpu_adam``, ``async_io``, ``pin_memory``; each result records the
  ops its rank 0 loaded under ``contender.deepspeed_ops_loaded``).
* NVMe (``device: nvme``): every job gets a fresh directory under ``--nvme-dir`` (default
  ``/tmp/bench_dp_nvme``; it must be a real disk, tmpfs is refused since the IO is O_DIRECT) as
  ``nvme_path``, deleted when the job ends; the driver samples its size on disk (``nvme_peak_mib``).
  DeepSpeed needs its ``async_io`` op, which needs libaio (``apt-get install libaio-dev``; check with
  ``deepspeed.ops.op_builder.AsyncIOBuilder().is_compatible()``; the first build takes minutes).
  Any NVMe device adds the ``aio`` section (block_size 1 MiB, queue_depth 8, intra_op_parallelism 1,
  single_submit false, overlap_events true: DeepSpeed's defaults; ``intra_op_parallelism`` is what
  DeepSpeed 0.19 reads, its older name ``thread_count`` is ignored by it and is an alias in deepshard).
  ``offload_optimizer`` nvme adds ``pipeline_read`` / ``pipeline_write`` true (they only overlap
  anything with more than one ``sub_group_size`` group per rank; at the default 1e9 a medium rank has one).
  ``offload_param`` nvme (stage 3, bf16: ``--dtypes bf16``) adds what DeepSpeed 0.19.8's parameter
  swapper needs:

  - ``buffer_size: 4e7`` elements per pinned swap buffer. A parameter's partition must fit in one
    buffer (``PartitionedParamSwapper.get_buffer`` asserts ``More elements N than buffer size``,
    DeepSpeed issue #3506); 4e7 holds the whole tied embedding (50304 x 768 = 38.6M) so it fits at any
    world size, and costs 5 x 4e7 x 2 B = 400 MB pinned per rank, not the 1 GB of the 1e8 default.
  - ``buffer_count: 5`` (the default) and ``stage3_max_reuse_distance: 0``. An NVMe parameter holds a
    swap buffer while it is available; with the default reuse distance (1e9 elements, more than the
    model) DeepSpeed releases no parameter once its trace is recorded, since each is reused in
    backward, so the sixth parameter of the second step fails with ``Not enough buffers 0 for
    swapping 1`` (``partitioned_param_swapper.swap_in``; DeepSpeed issue #3062, same defaults). With 0
    every parameter is released after use, and 5 buffers suffice (prefetch takes only free buffers).
  - ``max_in_cpu: 0``: with the default 1e9 (more than the model) DeepSpeed swaps every partition
    "permanently to CPU" into a host flat buffer at start-up and marks it ``not-nvme``
    (``stage3.py`` ``_create_param_groups_fp16_flat_cpu_memory`` / ``_move_to_flat_buffer``), so the
    parameters would live in RAM and the NVMe copies go stale; with 0 they stay on NVMe and are read
    back per use (DeepSpeed then also pins one swap-out buffer of the largest sub-group's full size).

  The optimizer's swap buffers (``offload_optimizer.buffer_count`` 4 = fp32 param, grad, exp_avg,
  exp_avg_sq) are one sub-group each: at the default ``sub_group_size`` 4 x 62M x 4 B = 1 GB pinned per
  rank on the medium GPT.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_worker.py"
IMPLS = ("deepshard", "ddp", "deepspeed", "fsdp2")
PEERS = ("ddp", "deepspeed", "fsdp2")
# Default contenders (launch order) and the peers that may be the "faster peer", by ZeRO stage.
DEFAULT_IMPLS = ("deepshard", "ddp", "deepspeed")
DEFAULT_IMPLS_STAGE3 = ("deepshard", "fsdp2", "deepspeed")
SHARDED_PEERS_STAGE3 = ("fsdp2", "deepspeed")
SHM_GLOB = "/dev/shm/deepspeed_allreduce_buffer_*"
POLL_S = 0.2
NVME_POLL_EVERY = 5  # sample the size of a job's NVMe directory every 5th RSS poll (1 s)
DEFAULT_NVME_DIR = Path(tempfile.gettempdir()) / "bench_dp_nvme"
OFFLOAD_DEVICES = ("none", "cpu", "nvme")
OFFLOAD_IMPLS = ("deepshard", "deepspeed")  # the only contenders that offload (and read the ds_config)

# ZeRO-Offload / ZeRO-Infinity settings that --offload-optimizer / --offload-param put into the shared
# ds_config: what DeepSpeed 0.19.8 needs to run the medium GPT on 2 ranks (why: the module docstring).
# ``nvme_path`` is filled in per job (a fresh directory under --nvme-dir); --extra-config overrides any.
OFFLOAD_OPTIMIZER_NVME: dict[str, Any] = {
    "pipeline_read": True,
    "pipeline_write": True,
}
OFFLOAD_PARAM_NVME: dict[str, Any] = {
    "buffer_count": 5,  # DeepSpeed's default; enough once parameters are released after use (below)
    "buffer_size": 40_000_000,  # elements per pinned swap buffer: >= the largest parameter (50304 x 768)
    "max_in_cpu": 0,  # no parameter partition kept in host RAM: they live on NVMe between uses
}
ZERO_PARAM_NVME: dict[str, Any] = {
    "stage3_max_reuse_distance": 0,  # release every parameter after use (else swap buffers run out)
}
AIO: dict[str, Any] = {
    "block_size": 1_048_576,
    "queue_depth": 8,
    "intra_op_parallelism": 1,  # DeepSpeed's older name for it, `thread_count`, is no longer read by 0.19
    "single_submit": False,
    "overlap_events": True,
}


def default_impls(stage: int | None, with_ddp: bool = False, offload: bool = False) -> list[str]:
    """The contenders when ``--impls`` is not given: stage 3 swaps DDP for FSDP2 (DDP on request);
    with offload only deepshard and DeepSpeed (DDP / FSDP2 keep everything in place)."""
    if offload:
        return list(OFFLOAD_IMPLS) + (["ddp"] if with_ddp else [])
    if stage == 3:
        return list(DEFAULT_IMPLS_STAGE3) + (["ddp"] if with_ddp else [])
    return list(DEFAULT_IMPLS)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` merged into ``base``, recursively for nested sections (``extra`` wins)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def offload_config(optimizer: str = "none", param: str = "none") -> dict[str, Any]:
    """The ds_config fragment for ``--offload-optimizer`` / ``--offload-param`` (empty when both are none).

    NVMe sections get ``nvme_path`` set per job by :func:`run_job`; any NVMe device adds the ``aio`` section.
    """
    zero: dict[str, Any] = {}
    if optimizer != "none":
        zero["offload_optimizer"] = {"device": optimizer}
        if optimizer == "nvme":
            zero["offload_optimizer"].update(OFFLOAD_OPTIMIZER_NVME)
    if param != "none":
        zero["offload_param"] = {"device": param}
        if param == "nvme":
            zero["offload_param"].update(OFFLOAD_PARAM_NVME)
            zero.update(ZERO_PARAM_NVME)
    if not zero:
        return {}
    out: dict[str, Any] = {"zero_optimization": zero}
    if "nvme" in (optimizer, param):
        out["aio"] = dict(AIO)
    return out


def uses_nvme(config: dict[str, Any]) -> bool:
    """Whether a ds_config (fragment) offloads anything to NVMe."""
    zero = config.get("zero_optimization") or {}
    return any((zero.get(k) or {}).get("device") == "nvme" for k in ("offload_optimizer", "offload_param"))


def with_nvme_path(config: dict[str, Any], path: str) -> dict[str, Any]:
    """``config`` with ``nvme_path`` of every NVMe offload section set to ``path``."""
    out = json.loads(json.dumps(config))
    zero = out.get("zero_optimization") or {}
    for key in ("offload_optimizer", "offload_param"):
        section = zero.get(key)
        if isinstance(section, dict) and section.get("device") == "nvme":
            section["nvme_path"] = path
    return out


def dir_bytes(path: Path) -> int:
    """Bytes allocated on disk by the files under ``path`` (0 if it is gone)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_blocks * 512
    return total


def filesystem_type(path: Path) -> str:
    """The type of the filesystem ``path`` is on, from /proc/mounts (longest matching mount point)."""
    best, fstype = "", "unknown"
    real = os.path.realpath(path)
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mnt = parts[1]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, parts[2]
    except OSError:
        pass
    return fstype


def clean_shm() -> int:
    """Delete the shared-memory segments DeepSpeed's CPU all-reduce leaves behind; return how many."""
    removed = 0
    for path in glob.glob(SHM_GLOB):
        try:
            os.unlink(path)
            removed += 1
        except OSError:
            pass
    return removed


def run_job(
    impl: str,
    dtype: str,
    steps: int,
    warmup: int,
    nproc: int,
    log: Path,
    extra_config: str = "{}",
    preset: str = "small",
    nvme_root: Path = DEFAULT_NVME_DIR,
) -> dict[str, Any]:
    """Run one torchrun job; return the worker's JSON plus each rank's peak RSS sampled from outside.

    When the config offloads to NVMe, the job gets a fresh directory under ``nvme_root`` as its
    ``nvme_path`` (its peak size on disk is sampled too), deleted when the job ends.
    """
    nvme_dir: Path | None = None
    if uses_nvme(json.loads(extra_config)):
        nvme_root.mkdir(parents=True, exist_ok=True)
        nvme_dir = Path(tempfile.mkdtemp(prefix=f"{impl}_{dtype}_", dir=nvme_root))
        extra_config = json.dumps(with_nvme_path(json.loads(extra_config), str(nvme_dir)))
    try:
        return _run_job(impl, dtype, steps, warmup, nproc, log, extra_config, preset, nvme_dir)
    finally:
        if nvme_dir is not None:
            shutil.rmtree(nvme_dir, ignore_errors=True)


def _run_job(
    impl: str,
    dtype: str,
    steps: int,
    warmup: int,
    nproc: int,
    log: Path,
    extra_config: str,
    preset: str,
    nvme_dir: Path | None,
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        str(WORKER), "--impl", impl, "--dtype", dtype, "--steps", str(steps), "--warmup", str(warmup),
        "--out", str(out), "--extra-config", extra_config, "--preset", preset,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    peak: dict[int, int] = {}
    nvme_peak = 0
    polls = 0
    start = time.perf_counter()
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env)
        agent = psutil.Process(proc.pid)
        while proc.poll() is None:
            if nvme_dir is not None and polls % NVME_POLL_EVERY == 0:
                nvme_peak = max(nvme_peak, dir_bytes(nvme_dir))
            polls += 1
            try:
                children = agent.children(recursive=True)
            except psutil.Error:
                children = []
            for child in children:
                try:
                    rss = child.memory_info().rss
                except psutil.Error:
                    continue
                peak[child.pid] = max(peak.get(child.pid, 0), rss)
            time.sleep(POLL_S)
    wall = time.perf_counter() - start
    if impl == "deepspeed":
        clean_shm()
    if proc.returncode != 0 or out.stat().st_size == 0:
        out.unlink(missing_ok=True)
        tail = log.read_text().splitlines()[-30:]
        raise RuntimeError(
            f"{impl}/{dtype} job failed (exit {proc.returncode}); log {log}:\n" + "\n".join(tail)
        )
    result = json.loads(out.read_text())
    out.unlink()
    for rank in result["ranks"]:
        rank["outside_peak_rss_mib"] = peak.get(rank["pid"], 0) / 2**20
    result["job_wall_s"] = wall
    if nvme_dir is not None:
        result["nvme_peak_mib"] = nvme_peak / 2**20
    return result


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def steady_tokens_per_s(result: dict[str, Any]) -> float:
    """Tokens/s at the median step time (a step lasts as long as its slowest rank): robust to bursts."""
    steps = [max(times) for times in zip(*(rank["step_ms"] for rank in result["ranks"]))]
    tokens_per_step = result["tokens_per_s"] * result["elapsed_s"] / result["steps"]
    return tokens_per_step / (_median(steps) / 1000)


METRICS = {
    "tokens_per_s": lambda r: r["tokens_per_s"],
    "steady_tokens_per_s": steady_tokens_per_s,
}


def _contender(mine: list[dict[str, Any]]) -> dict[str, Any]:
    world = mine[0]["world"]
    out: dict[str, Any] = {}
    for name, metric in METRICS.items():
        values = [metric(r) for r in mine]
        out[name] = {"values": values, "median": _median(values)}
    out["outside_peak_rss_mib"] = [
        _median([r["ranks"][i]["outside_peak_rss_mib"] for r in mine]) for i in range(world)
    ]
    out["ru_maxrss_mib"] = [_median([r["ranks"][i]["ru_maxrss_mib"] for r in mine]) for i in range(world)]
    out["phase_median_ms"] = {
        ph: _median([_median([rk["phase_median_ms"][ph] for rk in r["ranks"]]) for r in mine])
        for ph in ("forward", "backward", "step")
    }
    out["last_loss"] = mine[-1]["last_loss"]
    return out


def summarise(
    results: list[dict[str, Any]],
    impls: list[str],
    dtypes: list[str],
    faster_candidates: tuple[str, ...] = PEERS,
) -> dict[str, Any]:
    """Per dtype: per-contender medians, and per-round ratios deepshard / peer with median and range.

    The "faster peer" is the peer (among ``faster_candidates``, if any of them ran) with the higher
    median tokens/s over the whole run; deepshard is compared with it round by round. (Taking the
    per-round maximum of two noisy peers instead would bias the ratio below 1 even between equally
    fast contenders.)
    """
    summary: dict[str, Any] = {}
    for dtype in dtypes:
        rows = [r for r in results if r["dtype"] == dtype]
        rounds = sorted({r["round"] for r in rows})
        by = {(r["round"], r["impl"]): r for r in rows}
        contenders = {
            impl: _contender([by[(k, impl)] for k in rounds if (k, impl) in by])
            for impl in impls
            if any((k, impl) in by for k in rounds)
        }
        peers = [p for p in contenders if p in PEERS]  # in launch order
        ratios: dict[str, dict[str, Any]] = {}
        if "deepshard" in contenders and peers:
            candidates = [p for p in peers if p in faster_candidates] or peers
            faster = max(candidates, key=lambda p: contenders[p]["tokens_per_s"]["median"])
            for name, metric in METRICS.items():
                for peer in peers:
                    vals = [
                        metric(by[(k, "deepshard")]) / metric(by[(k, peer)])
                        for k in rounds
                        if (k, "deepshard") in by and (k, peer) in by
                    ]
                    label = f"{peer} (faster peer)" if peer == faster else peer
                    ratios[f"{name}:{label}"] = {
                        "metric": name,
                        "peer": label,
                        "values": vals,
                        "median": _median(vals),
                        "min": min(vals),
                        "max": max(vals),
                    }
        summary[dtype] = {"contenders": contenders, "ratios": ratios}
    return summary


def format_tables(summary: dict[str, Any]) -> str:
    """Markdown tables: one per dtype for the contenders, then the ratios."""
    lines = []
    for dtype, s in summary.items():
        lines += [
            f"### {dtype}",
            "",
            "| contender | tokens/s: median (per round) | steady tokens/s: median | peak RSS per rank, "
            "outside (MiB) | ru_maxrss per rank (MiB) | fwd / bwd+reduce / step (ms) | last loss |",
            "|---|---|---|---|---|---|---|",
        ]
        for impl, c in s["contenders"].items():
            tps = c["tokens_per_s"]
            per_round = ", ".join(f"{v:.0f}" for v in tps["values"])
            rss = " / ".join(f"{v:.0f}" for v in c["outside_peak_rss_mib"])
            maxrss = " / ".join(f"{v:.0f}" for v in c["ru_maxrss_mib"])
            ph = c["phase_median_ms"]
            lines.append(
                f"| {impl} | {tps['median']:.0f} ({per_round}) | {c['steady_tokens_per_s']['median']:.0f} "
                f"| {rss} | {maxrss} | {ph['forward']:.0f} / {ph['backward']:.0f} / {ph['step']:.0f} "
                f"| {c['last_loss']:.4f} |"
            )
        lines += ["", "| ratio | metric | median | range | per round |", "|---|---|---|---|---|"]
        for r in s["ratios"].values():
            per_round = ", ".join(f"{v:.3f}" for v in r["values"])
            metric = "tokens/s" if r["metric"] == "tokens_per_s" else "steady tokens/s"
            lines.append(
                f"| deepshard / {r['peer']} | {metric} | **{r['median']:.3f}** | {r['min']:.3f} – {r['max']:.3f} "
                f"| {per_round} |"
            )
        lines.append("")
    return "\n".join(lines)


def environment() -> dict[str, Any]:
    """What produced the numbers: versions, where deepshard was imported from, its git commit, the CPU."""
    probe = (
        "import json, torch, deepshard; d = {'torch': torch.__version__, 'deepshard_file': deepshard.__file__}\n"
        "try:\n import deepspeed; d['deepspeed'] = deepspeed.__version__\nexcept ImportError:\n pass\n"
        "print(json.dumps(d))"
    )
    env: dict[str, Any] = json.loads(
        subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, check=True
        ).stdout.splitlines()[-1]
    )
    src = Path(env["deepshard_file"]).parent
    git = subprocess.run(
        ["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(src), "status", "--porcelain", "--", "."], capture_output=True, text=True
    )
    env["deepshard_commit"] = (git.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")) or "unknown"
    env["python"] = platform.python_version()
    env["cpu"] = _cpu_name()
    env["cpus"] = os.cpu_count()
    return env


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def dry_run(
    impls: list[str], dtypes: list[str], extra_config: str, preset: str, nproc: int, nvme_root: Path
) -> None:
    """Print, per dtype and contender, the ds_config the worker would build it with; check they agree."""
    extra = json.loads(extra_config)
    if uses_nvme(extra):
        extra = with_nvme_path(extra, str(nvme_root / "<fresh per job>"))
    for dtype in dtypes:
        seen: list[dict[str, Any]] = []
        for impl in impls:
            cmd = [
                sys.executable, str(WORKER), "--impl", impl, "--dtype", dtype, "--preset", preset,
                "--extra-config", json.dumps(extra), "--world", str(nproc), "--print-config",
            ]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            report = json.loads(proc.stdout.strip().splitlines()[-1])
            config = report["ds_config"]
            if "deepshard_load_config" in report:
                print(f"{dtype} {impl}: deepshard.config.load_config -> {report['deepshard_load_config']}")
            if config is None:
                print(f"{dtype} {impl}: no ds_config")
            elif config in seen:
                print(f"{dtype} {impl}: the same ds_config as above")
            else:
                print(f"{dtype} {impl}: ds_config\n{json.dumps(config, indent=1)}")
                seen.append(config)
        print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated, from fp32,bf16")
    parser.add_argument(
        "--impls",
        default=None,
        help=f"comma-separated contenders, in launch order, from {','.join(IMPLS)} (default: "
        f"{','.join(DEFAULT_IMPLS)}; with --stage 3: {','.join(DEFAULT_IMPLS_STAGE3)})",
    )
    parser.add_argument(
        "--with-ddp",
        action="store_true",
        help="add DDP to the contenders (at --stage 3 it is not among the defaults)",
    )
    parser.add_argument("--rounds", type=int, default=5, help="times each contender runs (A B C, A B C, ...)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per job")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per job before timing")
    parser.add_argument("--nproc", type=int, default=2, help="ranks per job")
    parser.add_argument(
        "--extra-config",
        default="{}",
        help="JSON merged into the ds_config that deepshard and DeepSpeed share, e.g. "
        '\'{"communication_data_type": "fp32"}\' (DDP has no ds_config)',
    )
    parser.add_argument(
        "--preset", default="small", help="GPT preset: small (~23M) or medium (~124M, GPT-2 small)"
    )
    parser.add_argument(
        "--stage",
        type=int,
        default=None,
        help="ZeRO stage for deepshard and DeepSpeed (sets zero_optimization.stage in the shared config); "
        "3 also makes FSDP2 rather than DDP the default peer",
    )
    parser.add_argument(
        "--offload-optimizer",
        choices=OFFLOAD_DEVICES,
        default="none",
        help="zero_optimization.offload_optimizer.device (ZeRO-Offload; nvme adds pipeline_read/write and aio)",
    )
    parser.add_argument(
        "--offload-param",
        choices=OFFLOAD_DEVICES,
        default="none",
        help="zero_optimization.offload_param.device (stage 3; nvme adds buffer_count/buffer_size/max_in_cpu "
        "and aio)",
    )
    parser.add_argument(
        "--nvme-dir",
        default=str(DEFAULT_NVME_DIR),
        help="with NVMe offload: each job's nvme_path is a fresh directory under this one, deleted after "
        "the job (default: %(default)s; must be on a real disk, not tmpfs)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 round, 2 warmup + 3 timed steps")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the ds_config each contender would get (and whether deepshard's loader accepts it); run nothing",
    )
    parser.add_argument("--out-dir", default=None, help="logs and results.json (default: a new temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps, args.warmup = 1, 3, 2
    extra = merge(offload_config(args.offload_optimizer, args.offload_param), json.loads(args.extra_config))
    if args.stage is not None:
        extra.setdefault("zero_optimization", {})["stage"] = args.stage
    args.extra_config = json.dumps(extra)
    zero = extra.get("zero_optimization") or {}
    offload = any(
        (zero.get(k) or {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param")
    )
    nvme_root = Path(args.nvme_dir)

    dtypes = [d for d in args.dtypes.split(",") if d]
    if args.impls is None:
        impls = default_impls(args.stage, args.with_ddp, offload)
    else:
        impls = [i for i in args.impls.split(",") if i]
        if args.with_ddp and "ddp" not in impls:
            impls.append("ddp")
    args.impls = ",".join(impls)
    for name in dtypes:
        if name not in ("fp32", "bf16"):
            parser.error(f"--dtypes: unknown dtype {name!r}; choose from fp32, bf16")
    for name in impls:
        if name not in IMPLS:
            parser.error(f"--impls: unknown contender {name!r}; choose from {', '.join(IMPLS)}")
    if args.dry_run:
        dry_run(impls, dtypes, args.extra_config, args.preset, args.nproc, nvme_root)
        return
    if uses_nvme(extra):
        nvme_root.mkdir(parents=True, exist_ok=True)
        fstype = filesystem_type(nvme_root)
        if fstype in ("tmpfs", "ramfs"):
            parser.error(f"--nvme-dir {nvme_root} is on {fstype}; NVMe offload needs a real disk (O_DIRECT)")
        print(f"NVMe offload: per-job directories under {nvme_root} ({fstype})", flush=True)
    if "deepspeed" in impls and importlib.util.find_spec("deepspeed") is None:
        print(
            "DeepSpeed is not installed: skipping it (install with `DS_BUILD_OPS=0 pip install deepspeed` "
            "to compare against it).",
            flush=True,
        )
        impls.remove("deepspeed")
    out_dir = Path(args.out_dir) if args.out_dir else Path(tempfile.mkdtemp(prefix="bench_dp_"))
    (out_dir / "logs").mkdir(parents=True, exist_ok=True)

    env = environment()
    print(f"environment: {json.dumps(env)}", flush=True)
    print(
        f"preset {args.preset}: contenders {impls}, dtypes {dtypes}, {args.rounds} rounds, {args.warmup} warmup + {args.steps} timed "
        f"steps, {args.nproc} ranks, extra config {args.extra_config}, logs in {out_dir}",
        flush=True,
    )
    if clean_shm():
        print(f"removed stale {SHM_GLOB}", flush=True)
    if "deepspeed" in impls:
        # The same config as the timed jobs, so it JIT-builds every op they load: FusedAdam (no
        # offload), DeepSpeedCPUAdam (offload_optimizer) and async_io (any NVMe offload).
        print("untimed DeepSpeed job first (compiles its CPU ops on the first run ever) ...", flush=True)
        t0 = time.perf_counter()
        prepare_log = out_dir / "logs" / "deepspeed_prepare.log"
        prepared = run_job(
            "deepspeed",
            dtypes[0],
            1,
            1,
            args.nproc,
            prepare_log,
            args.extra_config,
            args.preset,
            nvme_root,
        )
        ops = ", ".join(prepared["contender"].get("deepspeed_ops_loaded", [])) or "none"
        print(f"  done in {time.perf_counter() - t0:.0f}s; ops loaded: {ops}", flush=True)

    results: list[dict[str, Any]] = []
    for k in range(args.rounds):
        for dtype in dtypes:
            for impl in impls:
                log = out_dir / "logs" / f"r{k}_{dtype}_{impl}.log"
                r = run_job(
                    impl,
                    dtype,
                    args.steps,
                    args.warmup,
                    args.nproc,
                    log,
                    args.extra_config,
                    args.preset,
                    nvme_root,
                )
                r["round"] = k
                results.append(r)
                rss = "/".join(f"{rk['outside_peak_rss_mib']:.0f}" for rk in r["ranks"])
                nvme = f"  NVMe peak {r['nvme_peak_mib']:.0f} MiB" if "nvme_peak_mib" in r else ""
                print(
                    f"round {k} {dtype:>4} {impl:>9}: {r['tokens_per_s']:7.0f} tokens/s "
                    f"(steady {steady_tokens_per_s(r):5.0f})  "
                    f"peak RSS {rss} MiB{nvme}  (job {r['job_wall_s']:.0f}s)",
                    flush=True,
                )

    faster_candidates = SHARDED_PEERS_STAGE3 if args.stage == 3 else PEERS
    summary = summarise(results, impls, dtypes, faster_candidates)
    report = {"environment": env, "args": vars(args), "results": results, "summary": summary}
    (out_dir / "results.json").write_text(json.dumps(report, indent=1))
    print()
    print(format_tables(summary))
    print(f"raw results: {out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
