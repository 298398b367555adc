"""Small DeepSpeed helpers that scripts and the Hugging Face stack import, with DeepSpeed's behaviour.

Each is served under its DeepSpeed path by :mod:`deepshard.compat.table`
(``deepspeed.runtime.utils.move_to_device``, ``deepspeed.utils.groups._get_data_parallel_group``, ...).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from deepshard import comm
from deepshard.accelerator import peak_rss_bytes
from deepshard.utils.logging import log_dist

DEEPSPEED_ENVIRONMENT_NAME = ".deepspeed_env"
"""The file of ``KEY=VALUE`` lines the launcher exports to every node (DeepSpeed's name; deepshard's
launcher also reads ``.deepshard_env``)."""


def move_to_device(item: Any, device: torch.device | str, criterion_func: Any = None) -> Any:
    """``item`` with every tensor in it (through lists, tuples and dicts) moved to ``device``.

    ``criterion_func(tensor)`` may limit which tensors move; others are returned as they are.
    """
    if torch.is_tensor(item):
        return item.to(device) if criterion_func is None or criterion_func(item) else item
    if isinstance(item, (list, tuple)):
        return type(item)(move_to_device(v, device, criterion_func) for v in item)
    if isinstance(item, dict):
        return {k: move_to_device(v, device, criterion_func) for k, v in item.items()}
    return item


def see_memory_usage(message: str, force: bool = False, ranks: list[int] | None = None) -> None:
    """Log ``message`` with this process's peak host memory and, on CUDA, allocated device memory (rank 0).

    Like DeepSpeed, nothing is logged unless ``force`` is true.
    """
    if not force:
        return
    text = f"{message} | peak RSS {peak_rss_bytes() / 2**30:.2f} GiB"
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        text += (
            f" | CUDA allocated {torch.cuda.memory_allocated() / 2**30:.2f} GiB, "
            f"max {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        )
    log_dist(text, ranks=ranks if ranks is not None else [0], level=logging.INFO)


def data_parallel_group() -> Any:
    """The data-parallel process group: every rank (deepshard's data parallelism spans the world)."""
    return torch.distributed.group.WORLD if comm.is_initialized() else None


def no_parallel_world_size(group: Any = None) -> int:
    """World size of a parallelism deepshard does not split over (sequence, expert): always 1."""
    del group
    return 1


def no_parallel_rank(group: Any = None) -> int:
    """Rank within a parallelism deepshard does not split over (sequence, expert): always 0."""
    del group
    return 0


def clone_tensors_for_torch_save(item: Any, device: torch.device | str = "cpu") -> Any:
    """``item`` with every tensor cloned to ``device`` (detached), so a view does not save its whole storage."""
    if torch.is_tensor(item):
        return item.detach().clone().to(device)
    if isinstance(item, (list, tuple)):
        return type(item)(clone_tensors_for_torch_save(v, device) for v in item)
    if isinstance(item, dict):
        return {k: clone_tensors_for_torch_save(v, device) for k, v in item.items()}
    return item


ORIGINAL_TORCH_ARANGE = torch.arange
"""``torch.arange`` as imported (DeepSpeed's ``partition_parameters._orig_torch_arange``)."""


def zero_wrapper_for_fp_tensor_constructor(
    fn: Any, target_fp_dtype: torch.dtype, target_device: torch.device | str | None = None
) -> Any:
    """A tensor constructor like ``fn`` that builds on ``target_device`` and casts float results.

    DeepSpeed's ``zero.Init`` installs such wrappers over ``torch.empty``/``zeros``/... so that a model is
    built directly in the training dtype, and the Hugging Face stack replaces this function to keep
    ``torch.arange`` (rotary buffers) in float32. deepshard's ``zero.Init`` wraps no constructor: values
    are computed in the dtype the model's code asks for and partitioned parameters are cast when the
    context exits, so buffers keep their dtypes whether or not this function is replaced.
    """

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get("device") is None and target_device is not None:
            kwargs["device"] = target_device
        tensor = fn(*args, **kwargs)
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            tensor = tensor.to(target_fp_dtype)
        return tensor.requires_grad_(bool(kwargs.get("requires_grad", False))) if torch.is_tensor(tensor) else tensor

    return wrapped
