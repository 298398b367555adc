"""Host optimizer step throughput (parameters updated per second) for ZeRO-Offload's CPU AdamW step.

Contenders, all on CPU fp32 tensors with the same hyper-parameters (lr 1e-3, betas (0.9, 0.999),
eps 1e-8, weight_decay 0.01, decoupled weight decay):

* ``fused``   -- ``torch.optim.AdamW(params, fused=True)`` (what deepshard's offload path uses);
* ``foreach`` -- ``torch.optim.AdamW(params, foreach=True)``;
* ``ds``      -- ``deepspeed.ops.adam.DeepSpeedCPUAdam(params, adamw_mode=True)``. With a
  ``DS_BUILD_OPS=0`` install its C++ op is JIT-compiled on first use: one untimed construction +
  step on a tiny tensor is done first and timed as the build (``--cold-build`` builds into an empty
  ``TORCH_EXTENSIONS_DIR`` so that the compile really happens; otherwise a cached build may just be
  loaded). If it cannot be built, the error is recorded and the other two are still measured.

For each size N (``--sizes``, in millions of elements) and each layout -- ``flat``: one tensor of N
elements; ``model``: a GPT-2-small-like mix of weight matrices, biases and LayerNorm vectors
(hidden 768) cut to N elements in all -- every contender gets its own copy of identical starting
parameters; the (random, fixed) gradients are shared, none of the optimizers writes to them. After
one untimed warm-up step each (state allocation), ``--rounds`` rounds follow; in each round every
contender runs ``--steps`` steps, contenders alternating within the round (A B C, then B C A, C A B,
... so that neither machine drift nor position in the round favours one). Reported per contender:
params/s of every round (N * steps / seconds) and their median; ratios fused/ds and foreach/ds of
the medians (``ratios``) and, paired within each round, the median/min/max of the per-round ratios
(``per_round_ratios``). Since all contenders end after the same number of steps from the same start with the
same gradients, their final parameters are compared too.

Correctness check (separate, ``--check-steps`` steps on a ``model`` layout of ``--check-numel``
elements, fresh random gradients each step): fused, foreach and ds from identical starts; reported
max absolute difference, max elementwise relative difference ``|a - b| / max(|b|, 1e-3)`` and the
difference relative to the largest parameter movement.

Threads: ``torch.set_num_threads(--threads)``; the DeepSpeed op parallelises with OpenMP, so the
script runs with ``OMP_NUM_THREADS=--threads`` (re-executing itself with it set if it is not);
the OpenMP runtimes loaded in the process are recorded.

Reproduce (about 4 minutes on 2 cores, including a ~1 minute cold compile of the DeepSpeed op):

    OMP_NUM_THREADS=2 python benchmarks/cpu_adam.py --sizes 1,10,50,100 --rounds 7 --steps 10 --cold-build

Writes ``benchmarks/results/cpu_adam.json`` (``--out``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
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

import torch

HYPER = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
CONTENDERS = ("fused", "foreach", "ds")
LAYOUTS = ("flat", "model")
HIDDEN = 768
REL_FLOOR = 1e-3
REPO = Path(__file__).resolve().parent.parent


def model_like_sizes(numel: int, hidden: int = HIDDEN) -> list[int]:
    """Tensor sizes of a GPT-2-like stack of blocks, repeated until ``numel`` elements, the last cut."""
    h = hidden
    block = [
        h, h,                # ln_1 weight, bias
        3 * h * h, 3 * h,    # attention qkv weight, bias
        h * h, h,            # attention projection weight, bias
        h, h,                # ln_2 weight, bias
        4 * h * h, 4 * h,    # mlp fc weight, bias
        4 * h * h, h,        # mlp projection weight, bias
    ]
    sizes: list[int] = []
    left = numel
    while left > 0:
        for s in block:
            take = min(s, left)
            sizes.append(take)
            left -= take
            if left == 0:
                break
    return sizes


def make_params(sizes: list[int], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in sizes]


def clone_params(base: list[torch.Tensor], grads: list[torch.Tensor]) -> list[torch.nn.Parameter]:
    params = []
    for b, gr in zip(base, grads):
        p = torch.nn.Parameter(b.clone())
        p.grad = gr  # shared, read-only for every contender
        params.append(p)
    return params


def make_optimizer(name: str, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if name == "fused":
        return torch.optim.AdamW(params, fused=True, **HYPER)
    if name == "foreach":
        return torch.optim.AdamW(params, foreach=True, **HYPER)
    if name == "ds":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, adamw_mode=True, **HYPER)
    raise ValueError(name)


def build_ds(cold: bool) -> dict[str, Any]:
    """Untimed-for-the-benchmark warm-up: import deepspeed, construct DeepSpeedCPUAdam, one step."""
    info: dict[str, Any] = {"cold_build_requested": cold}
    if cold:
        os.environ["TORCH_EXTENSIONS_DIR"] = tempfile.mkdtemp(prefix="cpu_adam_ext_")
    ext_dir = os.environ.get("TORCH_EXTENSIONS_DIR")
    if ext_dir is None:
        from torch.utils.cpp_extension import _get_build_directory

        try:
            ext_dir = str(Path(_get_build_directory("cpu_adam", verbose=False)).parent)
        except Exception:
            ext_dir = None
    info["extensions_dir"] = ext_dir
    info["cached_build_present"] = bool(ext_dir) and (Path(ext_dir) / "cpu_adam" / "cpu_adam.so").exists()
    t0 = time.perf_counter()
    try:
        import deepspeed  # noqa: F401

        info["import_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        p = torch.nn.Parameter(torch.zeros(16))
        p.grad = torch.ones(16)
        opt = make_optimizer("ds", [p])
        opt.step()
        info["build_and_first_step_s"] = time.perf_counter() - t1
        info["status"] = "ok"
        if ext_dir and (Path(ext_dir) / "cpu_adam" / "build.ninja").exists():
            for line in (Path(ext_dir) / "cpu_adam" / "build.ninja").read_text().splitlines():
                if line.startswith("cflags"):
                    flags = line.split()
                    info["op_flags"] = [f for f in flags if f.startswith(("-O", "-march", "-f", "-D__AVX"))]
    except Exception as e:  # report it and keep the other contenders
        info["status"] = "error"
        info["error"] = f"{type(e).__name__}: {e}"
        info["failed_after_s"] = time.perf_counter() - t0
    return info


def timed_steps(opt: torch.optim.Optimizer, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return time.perf_counter() - t


def compare(a: list[torch.Tensor], b: list[torch.Tensor], start: list[torch.Tensor]) -> dict[str, float]:
    """Differences of ``a`` from reference ``b`` (both started at ``start``).

    ``max_rel_diff`` is elementwise ``|a - b| / max(|b|, REL_FLOOR)`` (the floor keeps parameters
    that happen to sit near zero from dividing by ~0); ``max_abs_diff_over_max_update`` relates the
    difference to the largest distance any parameter moved from its start.
    """
    max_abs = max_rel = max_move = 0.0
    for x, y, s in zip(a, b, start):
        x, y = x.detach(), y.detach()
        d = (x - y).abs()
        max_abs = max(max_abs, d.max().item())
        max_rel = max(max_rel, (d / y.abs().clamp_min(REL_FLOOR)).max().item())
        max_move = max(max_move, (y - s).abs().max().item())
    return {
        "max_abs_diff": max_abs,
        "max_rel_diff": max_rel,
        "max_abs_diff_over_max_update": max_abs / max_move if max_move else float("nan"),
        "max_update": max_move,
    }


def run_case(numel: int, layout: str, contenders: list[str], rounds: int, steps: int) -> dict[str, Any]:
    sizes = [numel] if layout == "flat" else model_like_sizes(numel)
    base = make_params(sizes, seed=1)
    grads = make_params(sizes, seed=2)
    params = {c: clone_params(base, grads) for c in contenders}
    opts = {c: make_optimizer(c, params[c]) for c in contenders}
    for c in contenders:  # warm-up: state allocation, first touch of the pages
        opts[c].step()
    per_round: dict[str, list[float]] = {c: [] for c in contenders}
    orders = []
    for r in range(rounds):
        order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]
        orders.append(order)
        for c in order:
            per_round[c].append(numel * steps / timed_steps(opts[c], steps))
    result: dict[str, Any] = {
        "numel": numel,
        "layout": layout,
        "num_tensors": len(sizes),
        "steps_per_round": steps,
        "order_per_round": orders,
        "contenders": {
            c: {"median_params_per_s": statistics.median(v), "per_round_params_per_s": v}
            for c, v in per_round.items()
        },
    }
    med = {c: result["contenders"][c]["median_params_per_s"] for c in contenders}
    if "ds" in med:
        result["ratios"] = {f"{c}/ds": med[c] / med["ds"] for c in contenders if c != "ds"}
        paired = {c: [x / y for x, y in zip(per_round[c], per_round["ds"])] for c in contenders if c != "ds"}
        result["per_round_ratios"] = {
            f"{c}/ds": {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}
            for c, v in paired.items()
        }
        result["final_params_vs_ds"] = {
            c: compare(params[c], params["ds"], base) for c in contenders if c != "ds"
        }
    elif "fused" in med and "foreach" in med:
        result["final_params_vs_fused"] = {"foreach": compare(params["foreach"], params["fused"], base)}
    return result


def correctness(numel: int, steps: int, contenders: list[str]) -> dict[str, Any]:
    sizes = model_like_sizes(numel)
    base = make_params(sizes, seed=3)
    params = {c: [torch.nn.Parameter(b.clone()) for b in base] for c in contenders}
    opts = {c: make_optimizer(c, params[c]) for c in contenders}
    g = torch.Generator().manual_seed(4)
    for _ in range(steps):
        grads = [torch.randn(s, generator=g) for s in sizes]
        for c in contenders:
            for p, gr in zip(params[c], grads):
                p.grad = gr.clone()
            opts[c].step()
    ref = "ds" if "ds" in contenders else "fused"
    out: dict[str, Any] = {"numel": numel, "num_tensors": len(sizes), "steps": steps, "reference": ref}
    for c in contenders:
        if c != ref:
            out[f"{c}_vs_{ref}"] = compare(params[c], params[ref], base)
    if ref == "ds" and "fused" in contenders and "foreach" in contenders:
        out["foreach_vs_fused"] = compare(params["foreach"], params["fused"], base)
    return out


def environment(threads: int) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import deepspeed

        env["deepspeed"] = deepspeed.__version__
    except Exception as e:
        env["deepspeed"] = f"unavailable: {e}"
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env["cpu"] = cpu
    env["cpus"] = os.cpu_count()
    env["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    env["torch_num_threads"] = torch.get_num_threads()
    env["threads_requested"] = threads
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
        env["openmp_libraries_loaded"] = sorted(
            {ln.split()[-1] for ln in maps if "omp" in ln.rsplit("/", 1)[-1] and ln.split()[-1].startswith("/")}
        )
    except OSError:
        pass
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    env["repo_commit"] = git.stdout.strip() or "unknown"
    return env


def fmt(x: float) -> str:
    return f"{x / 1e6:,.0f}M"


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| N | layout | tensors | contender | median params/s | per-round params/s "
        "| / ds (medians) | / ds per round: median [min, max] |",
        "| ---: | --- | ---: | --- | ---: | --- | ---: | --- |",
    ]
    for r in results:
        for c, v in r["contenders"].items():
            ratio = r.get("ratios", {}).get(f"{c}/ds")
            pr = r.get("per_round_ratios", {}).get(f"{c}/ds")
            ratio_s = "" if ratio is None else f"{ratio:.2f}x"
            pr_s = "" if pr is None else f"{pr['median']:.2f}x [{pr['min']:.2f}, {pr['max']:.2f}]"
            per_round = ", ".join(fmt(x) for x in v["per_round_params_per_s"])
            lines.append(
                f"| {r['numel'] / 1e6:g}M | {r['layout']} | {r['num_tensors']} | {c} "
                f"| **{fmt(v['median_params_per_s'])}** | {per_round} | {ratio_s} | {pr_s} |"
            )
    return "\n".join(lines)


def ensure_omp_threads(threads: int) -> None:
    """libgomp reads OMP_NUM_THREADS when it is loaded (with torch): re-exec with it set if needed."""
    if os.environ.get("OMP_NUM_THREADS") != str(threads):
        print(f"re-executing with OMP_NUM_THREADS={threads}", flush=True)
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "OMP_NUM_THREADS": str(threads)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10,50", help="comma-separated N, in millions of elements")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated, from {','.join(LAYOUTS)}")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per case (>= 5 advised)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per contender per round")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and OMP_NUM_THREADS")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="comma-separated, in round order")
    parser.add_argument("--cold-build", action="store_true", help="build the DeepSpeed op into an empty dir")
    parser.add_argument("--check-numel", type=int, default=2_000_000, help="elements in the correctness check")
    parser.add_argument("--check-steps", type=int, default=20, help="steps in the correctness check")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "cpu_adam.json")
    args = parser.parse_args()
    ensure_omp_threads(args.threads)
    torch.set_num_threads(args.threads)
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    sizes = [int(float(s) * 1_000_000) for s in args.sizes.split(",")]
    t_start = time.perf_counter()
    load_start = os.getloadavg()

    ds_build: dict[str, Any] | None = None
    if "ds" in contenders:
        ds_build = build_ds(args.cold_build)
        print(f"DeepSpeedCPUAdam warm-up: {json.dumps(ds_build)}", flush=True)
        if ds_build["status"] != "ok":
            contenders.remove("ds")
    env = environment(args.threads)
    print(f"environment: {json.dumps(env)}", flush=True)

    check = correctness(args.check_numel, args.check_steps, contenders)
    print(f"correctness: {json.dumps(check)}", flush=True)

    results = []
    for numel in sizes:
        for layout in layouts:
            t = time.perf_counter()
            r = run_case(numel, layout, contenders, args.rounds, args.steps)
            r["case_wall_s"] = time.perf_counter() - t
            results.append(r)
            print(f"{numel / 1e6:g}M {layout}: " + json.dumps(
                {c: round(v["median_params_per_s"] / 1e6, 1) for c, v in r["contenders"].items()}
                | {k: round(v, 3) for k, v in r.get("ratios", {}).items()}
            ) + f" ({r['case_wall_s']:.0f}s)", flush=True)

    report = {
        "benchmark": "cpu_adam",
        "command": "OMP_NUM_THREADS={} python benchmarks/cpu_adam.py {}".format(
            os.environ.get("OMP_NUM_THREADS"), " ".join(sys.argv[1:])
        ),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "hyper_parameters": {**HYPER, "betas": list(HYPER["betas"]), "decoupled_weight_decay": True},
        "environment": env,
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg(),
        "ds_build": ds_build,
        "correctness": check,
        "results": results,
        "total_wall_s": time.perf_counter() - t_start,
    }
    if ds_build and ds_build.get("cold_build_requested") and ds_build.get("extensions_dir"):
        shutil.rmtree(ds_build["extensions_dir"], ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print()
    print(table(results))
    print(f"\nwrote {args.out} ({report['total_wall_s']:.0f}s)")


if __name__ == "__main__":
    main()
