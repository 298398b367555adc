"""``deepshard report``: what this machine offers deepshard, as a table or ``--json``.

Versions (Python, torch, deepshard, optional integrations), the accelerator and its device count, the
``torch.distributed`` backends, cores, memory, the measured matmul throughput per dtype (fp32, bf16,
fp16: a CPU without native half-precision units runs them tens of times slower), and at ``--path``: free disk and whether the NVMe offload
tier can use direct IO (``O_DIRECT``) there. Each probe that fails reports why instead of failing the
report.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import sys
import tempfile
from importlib import metadata
from typing import Any

OPTIONAL_PACKAGES = ("transformers", "safetensors", "tensorboard", "wandb", "triton", "mpi4py", "deepspeed")
DIRECT_IO_BLOCK = 4096  # the alignment O_DIRECT needs on common filesystems (logical block size)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def probe_direct_io(path: str, block: int = DIRECT_IO_BLOCK) -> tuple[bool, str]:
    """Write and read back one aligned block with ``O_DIRECT`` in ``path``; ``(works, detail)``."""
    if not hasattr(os, "O_DIRECT"):
        return False, f"O_DIRECT does not exist on {platform.system()}"
    try:
        fd, name = tempfile.mkstemp(prefix=".deepshard-dio-", dir=path)
    except OSError as err:
        return False, f"cannot create a file in {path}: {err.strerror}"
    os.close(fd)
    buffer = mmap.mmap(-1, block)  # anonymous mappings are page aligned, as O_DIRECT requires
    try:
        buffer.write(b"\xa5" * block)
        fd = os.open(name, os.O_RDWR | os.O_DIRECT)
        try:
            os.pwritev(fd, [buffer], 0)
            buffer.seek(0)
            buffer.write(b"\0" * block)
            os.preadv(fd, [buffer], 0)
        finally:
            os.close(fd)
        if buffer[:] != b"\xa5" * block:
            return False, "data read back with O_DIRECT differs from what was written"
        return True, f"O_DIRECT read/write of {block}-byte aligned blocks works"
    except OSError as err:
        return False, f"O_DIRECT failed: {err.strerror} (tmpfs and some network filesystems refuse it)"
    finally:
        buffer.close()
        os.unlink(name)


def _accelerator() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names = sorted({torch.cuda.get_device_name(i) for i in range(count)})
        return {"kind": "cuda", "device_count": count, "devices": names, "cuda": torch.version.cuda}
    return {"kind": "cpu", "device_count": 0, "devices": [], "cuda": None}


def _backends() -> dict[str, bool]:
    import torch.distributed as dist

    if not dist.is_available():
        return {"gloo": False, "nccl": False, "mpi": False}
    return {
        "gloo": dist.is_gloo_available(),
        "nccl": dist.is_nccl_available(),
        "mpi": dist.is_mpi_available(),
    }


MATMUL_SIZE = 512
MATMUL_BUDGET_S = 0.2


def _matmul() -> dict[str, Any]:
    """GFLOP/s of a timed matmul per dtype on the CPU (current thread count) and on the GPU if any."""
    import torch

    from deepshard.precision.throughput import matmul_gflops

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out: dict[str, Any] = {"size": MATMUL_SIZE, "threads": torch.get_num_threads()}
    for device in devices:
        row: dict[str, Any] = {}
        for name, dtype in dtypes.items():
            try:
                row[name] = matmul_gflops(dtype, device, MATMUL_SIZE, MATMUL_BUDGET_S)
            except RuntimeError as err:  # a dtype the device has no matmul kernel for
                row[name] = f"unavailable: {err}"
        out[device] = row
    return out


def collect(path: str) -> dict[str, Any]:
    """Gather the report as a JSON-ready dict; ``path`` is where disk and direct IO are probed."""
    import psutil
    import torch

    memory = psutil.virtual_memory()
    path = os.path.abspath(path)
    try:
        usage = shutil.disk_usage(path)
        disk: dict[str, Any] = {
            "path": path,
            "free_gib": usage.free / 2**30,
            "total_gib": usage.total / 2**30,
        }
    except OSError as err:
        disk = {"path": path, "error": err.strerror}
    works, detail = probe_direct_io(path) if os.path.isdir(path) else (False, f"{path} is not a directory")
    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "deepshard": _version("deepshard"),
            **{name: _version(name) for name in OPTIONAL_PACKAGES},
        },
        "accelerator": _accelerator(),
        "backends": _backends(),
        "cpu": {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0))},
        "memory": {"total_gib": memory.total / 2**30, "available_gib": memory.available / 2**30},
        "disk": disk,
        "matmul_gflops": _matmul(),
        "direct_io": {"path": path, "supported": works, "detail": detail},
    }


def _rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    versions = report["versions"]
    rows = [(f"{name} version", v or "not installed") for name, v in versions.items()]
    acc = report["accelerator"]
    devices = f" ({', '.join(acc['devices'])}, CUDA {acc['cuda']})" if acc["devices"] else ""
    rows.append(("accelerator", f"{acc['kind']}, {acc['device_count']} device(s){devices}"))
    rows += [(f"backend {b}", "yes" if ok else "no") for b, ok in report["backends"].items()]
    cpu, mem, disk, dio = report["cpu"], report["memory"], report["disk"], report["direct_io"]
    rows.append(("cpu cores", f"{cpu['cores']} ({cpu['usable_cores']} usable by this process)"))
    rows.append(("memory", f"{mem['available_gib']:.1f} GiB available of {mem['total_gib']:.1f} GiB"))
    if "error" in disk:
        rows.append((f"disk at {disk['path']}", f"unknown: {disk['error']}"))
    else:
        rows.append(
            (f"disk at {disk['path']}", f"{disk['free_gib']:.1f} GiB free of {disk['total_gib']:.1f} GiB")
        )
    mm = report["matmul_gflops"]
    for device in ("cpu", "cuda"):
        if device not in mm:
            continue
        fp32 = mm[device]["fp32"]
        for name, value in mm[device].items():
            if isinstance(value, str):
                rows.append((f"{device} matmul {name}", value))
                continue
            ratio = "" if name == "fp32" else f" ({value / fp32:.2g}x fp32)"
            rows.append((f"{device} matmul {name}", f"{value:.1f} GFLOP/s{ratio}, {mm['size']}^2, {mm['threads']} thread(s)"))
    rows.append((f"direct IO at {dio['path']}", ("yes: " if dio["supported"] else "no: ") + dio["detail"]))
    return rows


def format_table(report: dict[str, Any]) -> str:
    """Render the report as a two-column text table."""
    rows = _rows(report)
    width = max(len(key) for key, _ in rows)
    rule = "-" * (width + 2 + max(len(value) for _, value in rows))
    return "\n".join([rule, *(f"{key:<{width}}  {value}" for key, value in rows), rule])


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``deepshard report``: print the report to stdout."""
    parser = argparse.ArgumentParser(prog="deepshard report", description=__doc__)
    parser.add_argument(
        "--path",
        default=".",
        help="where to measure free disk and probe direct IO (point it at the NVMe offload directory)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    report = collect(args.path)
    sys.stdout.write((json.dumps(report, indent=2) if args.json else format_table(report)) + "\n")
    return 0
