"""The device abstraction: which device kind runs the job, its backend, streams and pinned memory.

``get_accelerator()`` returns one object per process. On a machine without CUDA it is the CPU
accelerator, whose stream and pinned-memory calls are no-ops, so the code above it has no
``if cuda`` branches. The method names follow DeepSpeed's accelerator API where they overlap.
"""

from __future__ import annotations

import abc
import contextlib
import os
from typing import Any

import psutil
import torch


class Accelerator(abc.ABC):
    """Common interface; :class:`CpuAccelerator` and :class:`CudaAccelerator` implement it."""

    name: str = "abstract"

    @abc.abstractmethod
    def device_name(self, index: int | None = None) -> str:
        """The torch device string, e.g. ``"cuda:1"`` or ``"cpu"``."""

    def device(self, index: int | None = None) -> torch.device:
        """The ``torch.device`` for ``index`` (the current device when ``None``)."""
        return torch.device(self.device_name(index))

    @abc.abstractmethod
    def current_device(self) -> int:
        """Index of the device this process uses."""

    def current_device_name(self) -> str:
        """The torch device string of the device this process uses."""
        return self.device_name(self.current_device())

    def set_device(self, index: int) -> None:
        """Select the device this process uses."""
        return None  # no-op by default: devices without the notion keep it

    @abc.abstractmethod
    def device_count(self) -> int:
        """How many devices of this kind the machine has."""

    @abc.abstractmethod
    def is_available(self) -> bool:
        """Whether this device kind can be used."""

    @abc.abstractmethod
    def communication_backend_name(self) -> str:
        """The ``torch.distributed`` backend for this device kind."""

    def synchronize(self) -> None:
        """Wait for all queued work on the current device."""
        return None  # no-op by default: devices without the notion keep it

    def stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        """Context manager running the enclosed work on ``stream`` (no-op without streams)."""
        return contextlib.nullcontext()

    def new_stream(self) -> Any:
        """A new side stream, or ``None`` where the device has no streams."""
        return None

    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        """A page-locked copy of a host tensor where that speeds up transfers; else the tensor."""
        return tensor

    def is_bf16_supported(self) -> bool:
        """Whether bfloat16 compute is supported."""
        return True

    def is_fp16_supported(self) -> bool:
        """Whether float16 compute is supported."""
        return True

    def manual_seed(self, seed: int) -> None:
        """Seed this device's random generator."""
        torch.manual_seed(seed)

    def empty_cache(self) -> None:
        """Return cached device memory to the system where the device caches it."""
        return None  # no-op by default: devices without the notion keep it

    @abc.abstractmethod
    def memory_allocated(self) -> int:
        """Bytes currently allocated on the device by this process."""

    @abc.abstractmethod
    def max_memory_allocated(self) -> int:
        """Peak bytes allocated on the device by this process."""

    def on_accelerator(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives on this device kind."""
        return tensor.device.type == self.name


class CpuAccelerator(Accelerator):
    """The CPU: gloo backend, no streams; "device memory" is the process's resident memory."""

    name = "cpu"

    def device_name(self, index: int | None = None) -> str:
        return "cpu"

    def current_device(self) -> int:
        return 0

    def device_count(self) -> int:
        # One "device" per local rank: the launcher decides how many processes share the cores.
        return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))

    def is_available(self) -> bool:
        return True

    def communication_backend_name(self) -> str:
        return "gloo"

    def is_fp16_supported(self) -> bool:
        # fp16 math runs on CPU but matrix products are very slow; it works, so report it.
        return True

    def memory_allocated(self) -> int:
        return int(psutil.Process().memory_info().rss)

    def max_memory_allocated(self) -> int:
        return peak_rss_bytes()


class CudaAccelerator(Accelerator):
    """NVIDIA GPUs: NCCL backend, CUDA streams, pinned host memory."""

    name = "cuda"

    def device_name(self, index: int | None = None) -> str:
        return "cuda" if index is None else f"cuda:{index}"

    def current_device(self) -> int:
        return torch.cuda.current_device()

    def set_device(self, index: int) -> None:
        torch.cuda.set_device(index)

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def communication_backend_name(self) -> str:
        return "nccl"

    def synchronize(self) -> None:
        torch.cuda.synchronize()

    def stream(self, stream: Any) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(stream)

    def new_stream(self) -> Any:
        return torch.cuda.Stream()

    def pin_memory(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.pin_memory()

    def is_bf16_supported(self) -> bool:
        return torch.cuda.is_bf16_supported()

    def manual_seed(self, seed: int) -> None:
        torch.cuda.manual_seed(seed)

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def memory_allocated(self) -> int:
        return torch.cuda.memory_allocated()

    def max_memory_allocated(self) -> int:
        return torch.cuda.max_memory_allocated()


def peak_rss_bytes() -> int:
    """Peak resident set size of this process in bytes (``ru_maxrss``), or current RSS where unknown."""
    try:
        import resource

        # Linux reports kilobytes.
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):
        return int(psutil.Process().memory_info().rss)


_ACCELERATOR: Accelerator | None = None


def _choose() -> Accelerator:
    wanted = os.environ.get("DS_ACCELERATOR", os.environ.get("DEEPSHARD_ACCELERATOR", "")).lower()
    if wanted not in ("", "cpu", "cuda"):
        raise ValueError(
            f"DS_ACCELERATOR={wanted!r} is not a device kind deepshard supports; use 'cpu' or 'cuda', "
            "or unset it to choose automatically."
        )
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ValueError("DS_ACCELERATOR='cuda' but no CUDA device is available; unset it or use 'cpu'.")
    if wanted == "cpu" or not torch.cuda.is_available():
        return CpuAccelerator()
    return CudaAccelerator()


def get_accelerator() -> Accelerator:
    """The accelerator of this process: CUDA when available (or ``DS_ACCELERATOR=cuda``), else CPU."""
    global _ACCELERATOR
    if _ACCELERATOR is None:
        _ACCELERATOR = _choose()
    return _ACCELERATOR


def set_accelerator(accelerator: Accelerator) -> None:
    """Override the process's accelerator (for tests, or to force the CPU on a GPU machine)."""
    global _ACCELERATOR
    _ACCELERATOR = accelerator
