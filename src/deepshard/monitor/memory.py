"""This process's memory: device memory on an accelerator, resident set size (RSS) on a CPU."""

from __future__ import annotations

import psutil
import torch

from deepshard.accelerator import peak_rss_bytes


def current_and_peak_bytes(device: torch.device) -> tuple[int, int]:
    """``(current, peak)`` bytes: allocated / max allocated on CUDA, else RSS / peak RSS of the process."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    rss = psutil.Process().memory_info().rss
    return rss, max(peak_rss_bytes(), rss)
