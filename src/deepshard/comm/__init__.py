"""``deepshard.comm``: a thin facade over ``torch.distributed`` with DeepSpeed's function names.

Every function works in a single process without a process group (rank 0 of a world of 1, and
collectives are identities), so code written against this module runs unchanged at any scale.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

from deepshard.comm import host_collectives
from deepshard.comm.discovery import RankInfo, discover, export_torch_env, has_torch_env
from deepshard.utils.logging import logger

__all__ = [
    "ReduceOp",
    "RankInfo",
    "init_distributed",
    "is_initialized",
    "is_available",
    "get_rank",
    "get_world_size",
    "get_local_rank",
    "get_local_world_size",
    "get_backend",
    "barrier",
    "all_reduce",
    "broadcast",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "new_group",
    "destroy_process_group",
    "set_collective_observer",
]

# --- observing collectives (the comms logger) -------------------------------------------------------
# An observer is called instead of each collective below as ``observer(name, fn, args, kwargs)`` and
# must call ``fn(*args, **kwargs)`` itself and return its result. With none installed (the default)
# a collective costs one extra Python call and a global read; see deepshard.comm.comms_log.
CollectiveObserver = Callable[[str, Callable[..., Any], tuple[Any, ...], dict[str, Any]], Any]
_observer: CollectiveObserver | None = None
_F = TypeVar("_F", bound=Callable[..., Any])


def set_collective_observer(observer: CollectiveObserver | None) -> CollectiveObserver | None:
    """Install ``observer`` (``None`` removes it) for every collective of this module; returns the previous one."""
    global _observer
    previous, _observer = _observer, observer
    return previous


def _observed(fn: _F) -> _F:
    name = fn.__name__

    @functools.wraps(fn)
    def collective(*args: Any, **kwargs: Any) -> Any:
        observer = _observer
        if observer is None:
            return fn(*args, **kwargs)
        return observer(name, fn, args, kwargs)

    return collective  # type: ignore[return-value]


def __getattr__(name: str) -> Any:
    """DeepSpeed's comms-logger API (``configure``, ``log_summary``, ``comms_logger``), served lazily by
    :mod:`deepshard.comm.comms_log` so that this layer imports nothing above it."""
    if name in ("configure", "log_summary", "comms_logger"):
        from deepshard.comm import comms_log as comms_logger

        return getattr(comms_logger, name)
    raise AttributeError(f"module 'deepshard.comm' has no attribute {name!r}")


DEFAULT_PORT = 29500
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)


def init_distributed(
    dist_backend: str | None = None,
    auto_mpi_discovery: bool = True,
    distributed_port: int = DEFAULT_PORT,
    verbose: bool = True,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    init_method: str | None = None,
    dist_init_required: bool | None = None,
    config: Any = None,
    rank: int = -1,
    world_size: int = -1,
) -> None:
    """Initialise ``torch.distributed`` the way DeepSpeed's ``init_distributed`` does.

    Rank and rendezvous come from torchrun's variables, else (with ``auto_mpi_discovery``) from
    Open MPI / MPICH / Intel MPI or SLURM variables. A process with none of them is a single-rank job:
    no process group is created unless ``dist_init_required=True`` (then a one-rank group is made).
    The backend defaults to the accelerator's (``nccl`` on GPUs, ``gloo`` on CPUs). Calling it when a
    group already exists does nothing.
    """
    del config  # accepted for signature compatibility; the backend comes from the accelerator
    if dist_init_required is False or dist.is_initialized():
        return
    from deepshard.accelerator import get_accelerator

    backend = dist_backend or get_accelerator().communication_backend_name()
    if rank >= 0 and world_size > 0:
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world_size))
    if not has_torch_env():
        info = discover() if auto_mpi_discovery else RankInfo(0, 1, 0, 1, None, "single")
        if info.source == "single" and not dist_init_required and init_method is None:
            if verbose:
                logger.info(
                    "no launcher environment found: running as a single process without a process group"
                )
            return
        export_torch_env(info, distributed_port)
    if backend == "nccl":
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if verbose:
        logger.info(
            "initialising torch.distributed: backend=%s rank=%s world_size=%s master=%s:%s",
            backend,
            os.environ.get("RANK"),
            os.environ.get("WORLD_SIZE"),
            os.environ.get("MASTER_ADDR"),
            os.environ.get("MASTER_PORT"),
        )
    dist.init_process_group(backend=backend, init_method=init_method or "env://", timeout=timeout)
    # A DeepSpeed script ends without destroy_process_group(). On gloo, a worker thread that finishes a
    # collective after the main thread let go of it drops the collective's tensors itself, which needs
    # the GIL; when the main thread is already finalizing the interpreter, that thread is unwound
    # through a noexcept destructor and the process aborts ("terminate called without an active
    # exception", exit -6; 7 of 53 runs of tests/fixtures/deepspeed_scripts/train_ds.py on 2 ranks; 0 of 40 with this hook).
    # At exit the group created here is destroyed and the GIL released briefly for such a thread.
    atexit.register(_destroy_at_exit)


EXIT_DRAIN_S = 0.1  # GIL-free wait at exit for gloo workers still dropping a finished collective


def _destroy_at_exit() -> None:
    """At interpreter exit: destroy the default process group that :func:`init_distributed` created."""
    if not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    except Exception as error:  # exit path: report, never raise
        logger.debug("destroy_process_group at exit failed: %s", error)
    time.sleep(EXIT_DRAIN_S)  # sleeps without the GIL, before finalization starts


def is_available() -> bool:
    """Whether ``torch.distributed`` is built in."""
    return dist.is_available()


def is_initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group: Any = None) -> int:
    """Rank in ``group`` (0 without a process group)."""
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group: Any = None) -> int:
    """Size of ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if is_initialized() else 1


def get_global_rank(group: Any, group_rank: int) -> int:
    """The global rank of ``group``'s rank ``group_rank`` (itself for the default group or no process group)."""
    if group is None or not is_initialized():
        return group_rank
    return int(dist.get_global_rank(group, group_rank))


def world_id() -> int | None:
    """An identity of the current default process group (another once it is re-created), or ``None``."""
    return id(dist.distributed_c10d._get_default_group()) if is_initialized() else None


def get_local_rank() -> int:
    """This process's index on its node (``LOCAL_RANK``)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def get_local_world_size() -> int:
    """Processes on this node (``LOCAL_WORLD_SIZE``)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(get_world_size())))


def get_backend(group: Any = None) -> str | None:
    """The backend name of ``group``, or ``None`` without a process group."""
    return str(dist.get_backend(group)) if is_initialized() else None


@_observed
def barrier(group: Any = None) -> None:
    """Wait for every rank of ``group``."""
    if is_initialized():
        dist.barrier(group=group)


@_observed
def all_reduce(
    tensor: torch.Tensor, op: Any = ReduceOp.SUM, group: Any = None, async_op: bool = False
) -> Any:
    """In-place all-reduce of ``tensor`` (identity in a single process)."""
    if is_initialized():
        return dist.all_reduce(tensor, op=op, group=group, async_op=async_op)
    return None


@_observed
def broadcast(tensor: torch.Tensor, src: int, group: Any = None, async_op: bool = False) -> Any:
    """Broadcast ``tensor`` from global rank ``src``."""
    if is_initialized():
        return dist.broadcast(tensor, src=src, group=group, async_op=async_op)
    return None


@_observed
def all_gather(
    tensor_list: list[torch.Tensor], tensor: torch.Tensor, group: Any = None, async_op: bool = False
) -> Any:
    """Gather ``tensor`` from every rank into ``tensor_list``."""
    if is_initialized():
        return dist.all_gather(tensor_list, tensor, group=group, async_op=async_op)
    tensor_list[0].copy_(tensor)
    return None


# torch 2.13 renamed the flat collectives (the old names warn); older torch has only the old names.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@_observed
def all_gather_into_tensor(
    output: torch.Tensor, tensor: torch.Tensor, group: Any = None, async_op: bool = False
) -> Any:
    """Gather equal-size shards into one flat ``output`` ordered by rank.

    ``tensor`` may be this rank's chunk of ``output`` (in place). Host tensors on gloo take the faster
    broadcast-based algorithm of :mod:`deepshard.comm.host_collectives`.
    """
    if is_initialized():
        if host_collectives.serves(output, group):
            return host_collectives.all_gather(output, tensor, group=group, async_op=async_op)
        return _all_gather_flat(output, tensor, group=group, async_op=async_op)
    output.copy_(tensor.reshape(output.shape))
    return None


@_observed
def reduce_scatter_tensor(
    output: torch.Tensor,
    tensor: torch.Tensor,
    op: Any = ReduceOp.SUM,
    group: Any = None,
    async_op: bool = False,
    scratch: torch.Tensor | None = None,
) -> Any:
    """Reduce ``tensor`` across ranks and keep this rank's equal-size chunk in ``output``.

    Host tensors on gloo (``SUM``) take the all-to-all algorithm of
    :mod:`deepshard.comm.host_collectives`, which uses ``scratch`` (``tensor``'s size) when given.
    """
    if is_initialized():
        if op == ReduceOp.SUM and host_collectives.serves(tensor, group):
            return host_collectives.reduce_scatter(
                output, tensor, group=group, async_op=async_op, scratch=scratch
            )
        return _reduce_scatter_flat(output, tensor, op=op, group=group, async_op=async_op)
    output.copy_(tensor.reshape(output.shape))
    return None


def reduce_scatter_needs_scratch(tensor: torch.Tensor, group: Any = None) -> bool:
    """Whether :func:`reduce_scatter_tensor` of ``tensor`` would use a ``scratch`` buffer."""
    return is_initialized() and host_collectives.serves(tensor, group)


@_observed
def all_to_all_single(
    output: torch.Tensor, tensor: torch.Tensor, group: Any = None, async_op: bool = False
) -> Any:
    """Exchange equal chunks of ``tensor`` between all ranks."""
    if is_initialized():
        return dist.all_to_all_single(output, tensor, group=group, async_op=async_op)
    output.copy_(tensor)
    return None


def new_group(ranks: list[int] | None = None, **kwargs: Any) -> Any:
    """A new process group over ``ranks`` (``None`` without a default group)."""
    return dist.new_group(ranks, **kwargs) if is_initialized() else None


def destroy_process_group(group: Any = None) -> None:
    """Tear down ``group`` (the default group when ``None``)."""
    if is_initialized():
        dist.destroy_process_group(group)
