"""DeepSpeed's fragment API: read and write the full or local fp32 state behind a parameter.

With ZeRO each rank holds only its dim-0 rows of the fp32 master, of the optimizer state and (stage
2) of the gradient. ``safe_get_full_*`` all-gather those rows into a whole tensor on every rank, so
they are collectives: call them on every rank of the data-parallel group, in the same order.
``safe_get_local_*`` return this rank's rows without communication. ``safe_set_full_*`` take a whole
tensor (the same on every rank) and keep this rank's rows; ``safe_set_local_*`` take the rows.

Unlike DeepSpeed, setting the fp32 master also updates the module's (low-precision) parameter at
once, so the next forward uses the new value. A parameter is looked up in the registry the engine
fills when it is built; a parameter not managed by an engine is an error that says so.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from deepshard.precision.master import as_rows
from deepshard.zero.collectives import gather_whole
from deepshard.zero.layout import ShardSpec

# id(param) -> (weak param, weak partition): entries never keep an engine's state alive.
_REGISTRY: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[Any]]] = {}
_T = TypeVar("_T")


def register(params: list[torch.Tensor], partition: Any) -> None:
    """Record that ``partition`` (a :class:`~deepshard.zero.partition.ZeroPartition`) manages ``params``."""
    for key in [k for k, (p, part) in _REGISTRY.items() if p() is None or part() is None]:
        del _REGISTRY[key]
    for p in params:
        _REGISTRY[id(p)] = (weakref.ref(p), weakref.ref(partition))


def _resident(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Run a fragment accessor with offloaded (NVMe) masters and state read into memory, written back after."""

    @functools.wraps(fn)
    def wrapper(param: torch.Tensor, *args: Any) -> _T:
        with _partition_of(param).resident():
            return fn(param, *args)

    return wrapper


def _partition_of(param: torch.Tensor) -> Any:
    entry = _REGISTRY.get(id(param))
    partition = entry[1]() if entry is not None else None
    if entry is None or entry[0]() is not param or partition is None:
        raise ValueError(
            f"this parameter (shape {tuple(param.shape)}) is not managed by a deepshard engine; pass a parameter "
            "of engine.module (frozen parameters, requires_grad=False, have no fp32 state)"
        )
    return partition


def _gather_rows(local: torch.Tensor, shape: torch.Size, partition: Any) -> torch.Tensor:
    """Whole fp32 tensor of ``shape`` from every rank's dim-0 rows (its own copy when nothing is sharded)."""
    world = partition.world if partition.stage.shard_optimizer else 1
    return gather_whole(local, shape, world, partition.group)


def _my_rows(whole: torch.Tensor, param: torch.Tensor, partition: Any) -> torch.Tensor:
    """This rank's rows of a whole-shaped tensor (the tensor itself when nothing is sharded)."""
    if whole.shape != param.shape:
        raise ValueError(
            f"value has shape {tuple(whole.shape)} but the parameter has shape {tuple(param.shape)}"
        )
    if not partition.stage.shard_optimizer:
        return whole
    start, end = ShardSpec(param.shape, partition.world).row_range(partition.rank)
    return as_rows(whole)[start:end]


def _local_grad(param: torch.Tensor, partition: Any) -> torch.Tensor | None:
    """This rank's rows of the reduced gradient (already a shard at stage 2)."""
    grad = partition.reduced_grads().get(id(param))
    return grad if grad is None or grad.shape != param.shape else _my_rows(grad, param, partition)


# ---------------------------------------------------------------- full (collective)
@_resident
def safe_get_full_fp32_param(param: torch.Tensor) -> torch.Tensor:
    """The whole fp32 master of ``param`` (a collective at ZeRO stages 1-3)."""
    partition = _partition_of(param)
    return _gather_rows(partition.masters.master_of(param), param.shape, partition)


@_resident
def safe_set_full_fp32_param(param: torch.Tensor, value: torch.Tensor) -> None:
    """Set the fp32 master of ``param`` (and the parameter itself) from a whole tensor; call on every rank."""
    partition = _partition_of(param)
    partition.begin_update()
    with torch.no_grad():
        partition.masters.master_of(param).copy_(_my_rows(value, param, partition))
    partition.publish()  # the module parameter follows its master at once


def safe_get_full_grad(param: torch.Tensor) -> torch.Tensor | None:
    """The whole reduced fp32 gradient of ``param`` (after backward, before step), or ``None``."""
    partition = _partition_of(param)
    local = _local_grad(param, partition)
    return None if local is None else _gather_rows(local, param.shape, partition)


def safe_set_full_grad(param: torch.Tensor, value: torch.Tensor) -> None:
    """Replace the reduced gradient of ``param`` with a whole tensor (same on every rank)."""
    partition = _partition_of(param)
    grad = partition.reduced_grads().get(id(param))
    if grad is None:
        raise ValueError("this parameter has no gradient buffer; it is not trained by the engine")
    with torch.no_grad():
        if grad.shape == param.shape:
            grad.copy_(value)
        else:
            grad.copy_(_my_rows(value, param, partition))


@_resident
def safe_get_full_optimizer_state(param: torch.Tensor, optim_state_key: str) -> torch.Tensor | None:
    """The whole optimizer state ``optim_state_key`` (e.g. ``"exp_avg"``) of ``param``, or ``None``."""
    partition = _partition_of(param)
    local = safe_get_local_optimizer_state(param, optim_state_key)
    return None if local is None else _gather_rows(local, param.shape, partition)


@_resident
def safe_set_full_optimizer_state(param: torch.Tensor, value: torch.Tensor, optim_state_key: str) -> None:
    """Set optimizer state ``optim_state_key`` of ``param`` from a whole tensor (same on every rank)."""
    partition = _partition_of(param)
    safe_set_local_optimizer_state(param, _my_rows(value, param, partition), optim_state_key)


# ---------------------------------------------------------------- local (no communication)
@_resident
def safe_get_local_fp32_param(param: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the fp32 master of ``param`` (the whole master when it is not sharded)."""
    return _partition_of(param).masters.master_of(param).detach()


@_resident
def safe_set_local_fp32_param(param: torch.Tensor, value: torch.Tensor) -> None:
    """Overwrite this rank's rows of the fp32 master; the parameter is refreshed (a collective when sharded)."""
    partition = _partition_of(param)
    partition.begin_update()
    with torch.no_grad():
        partition.masters.master_of(param).copy_(value)
    partition.publish()  # the module parameter follows its master at once


def safe_get_local_grad(param: torch.Tensor) -> torch.Tensor | None:
    """This rank's rows of the reduced gradient of ``param``."""
    return _local_grad(param, _partition_of(param))


@_resident
def safe_get_local_optimizer_state(param: torch.Tensor, optim_state_key: str) -> torch.Tensor | None:
    """This rank's rows of optimizer state ``optim_state_key`` (``None`` before the first step)."""
    partition = _partition_of(param)
    master = partition.masters.master_of(param)
    state = partition.optimizer.state.get(master, {}) if partition.optimizer is not None else {}
    value = state.get(optim_state_key)
    return value if isinstance(value, torch.Tensor) else None


@_resident
def safe_set_local_optimizer_state(param: torch.Tensor, value: torch.Tensor, optim_state_key: str) -> None:
    """Overwrite this rank's rows of optimizer state ``optim_state_key``."""
    partition = _partition_of(param)
    master = partition.masters.master_of(param)
    if partition.optimizer is None:
        raise ValueError("the engine has no optimizer, so there is no optimizer state to set")
    state = partition.optimizer.state[master]
    if optim_state_key not in state:
        raise ValueError(
            f"optimizer state {optim_state_key!r} does not exist yet for this parameter (have: {sorted(state)}); "
            "optimizer state is created by the first step"
        )
    with torch.no_grad():
        state[optim_state_key].copy_(value)
