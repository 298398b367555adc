"""This process's memory: device memory on an accelerator, resident set size (RSS) on a CPU."""

from __future__ import annotations

import resource
import sys

import psutil
import torch


def current_and_peak_bytes(device: torch.device) -> tuple[int, int]:
    """``(current, peak)`` bytes: allocated / max allocated on CUDA, else RSS / peak RSS of the process."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    rss = psutil.Process().memory_info().rss
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak *= 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return rss, max(peak, rss)
