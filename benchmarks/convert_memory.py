"""Peak resident memory of ``deepshard convert`` on a >= 1 GB checkpoint, measured from outside.

Builds a GPT of ~300M parameters (vocab 50304, d_model 1024, 20 layers: 1.2 GB in fp32) with the
engine (fp32, ZeRO stage 0, one process; no training step is needed: the weights are what convert
reads), saves a checkpoint, then runs ``deepshard convert CKPT OUT`` in a subprocess while this
driver samples its resident set size with psutil every 5 ms. For reference it also measures a
process that only imports what convert imports (torch, DCP, deepshard.checkpoint): the floor.

    python benchmarks/convert_memory.py                       # fp32 output
    python benchmarks/convert_memory.py --dtype bf16 --keep   # bf16 output; keep the files

Reports: model bytes, largest tensor, peak RSS of convert, of the import-only floor, and the ratio
peak / model (the target is <= 0.3).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

IMPORT_ONLY = "import torch, torch.distributed.checkpoint, deepshard.checkpoint.export; import time; time.sleep(1)"


def build_and_save(ckpt: Path, n_layers: int) -> tuple[int, int]:
    """Save a checkpoint of the benchmark model; return (model bytes, largest tensor bytes)."""
    import torch

    import deepshard
    from deepshard.testing.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50304, seq_len=128, d_model=1024, n_layers=n_layers, n_heads=16))
    engine, _, _, _ = deepshard.initialize(
        model=model, model_parameters=model.parameters(),
        config={"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}},
    )
    tensors = list(dict(engine.module.named_parameters()).values())
    engine.save_checkpoint(str(ckpt))
    return sum(t.numel() * t.element_size() for t in tensors), max(t.numel() * t.element_size() for t in tensors)


def peak_rss(cmd: list[str], interval: float = 0.005) -> tuple[int, float, int]:
    """Run ``cmd``; return (peak RSS in bytes, seconds, exit status), sampling from outside."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(interval)
    _, err = proc.communicate()
    if proc.returncode:
        sys.stderr.write(err.decode())
    return peak, time.perf_counter() - start, proc.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=20)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--workdir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and the export")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert_memory_"))
    ckpt, out = work / "ckpt", work / "out"
    try:
        model_bytes, largest = build_and_save(ckpt, args.layers)
        floor, _, _ = peak_rss([sys.executable, "-c", IMPORT_ONLY])
        cli = shutil.which("deepshard") or "deepshard"
        peak, seconds, status = peak_rss([cli, "convert", str(ckpt), str(out), "--dtype", args.dtype])
        if status:
            raise SystemExit(f"deepshard convert failed with exit status {status}")
        written = sum(f.stat().st_size for f in out.iterdir())
        mib = 2**20
        print(f"model: {model_bytes / mib:.0f} MiB fp32 ({model_bytes // 4:,} parameters), "
              f"largest tensor {largest / mib:.0f} MiB; export {args.dtype}: {written / mib:.0f} MiB in {seconds:.1f}s")
        print(f"peak RSS: convert {peak / mib:.0f} MiB, import-only floor {floor / mib:.0f} MiB, "
              f"convert above floor {(peak - floor) / mib:.0f} MiB")
        print(f"peak / model = {peak / model_bytes:.3f}  (target <= 0.3); "
              f"(peak - floor) / largest tensor = {(peak - floor) / largest:.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
