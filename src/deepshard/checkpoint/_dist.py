"""Stateless object collectives used by checkpointing; identities without a process group.

Checkpoint bookkeeping (the tag, the temporary directory's token, per-file checksums, errors) is a
handful of small Python objects per rank, so these helpers use the pickle-based object collectives
of ``torch.distributed``. Tensors never travel through them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh


def initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 without a process group)."""
    return dist.get_rank(group) if initialized() else 0


def world_size(group: Any = None) -> int:
    """Ranks in ``group`` (1 without a process group)."""
    return dist.get_world_size(group) if initialized() else 1


def broadcast_object(obj: Any, group: Any = None) -> Any:
    """``obj`` as held by the group's first rank, on every rank."""
    if not initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(
        box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group
    )
    return box[0]


def all_gather_objects(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def raise_if_any(error: str | None, group: Any = None, kind: type[Exception] = RuntimeError) -> None:
    """Collective: raise ``kind`` on every rank if any rank reports an error (so no rank is left waiting)."""
    errors = sorted({e for e in all_gather_objects(error, group) if e})
    if errors:
        raise kind("\n".join(errors))


def device_mesh(group: Any, device_type: str) -> DeviceMesh:
    """A 1-D device mesh over the ranks of ``group`` (``None``: the default group), in group-rank order."""
    pg = group if group is not None else dist.group.WORLD
    assert pg is not None, "a device mesh needs an initialised process group"
    return DeviceMesh.from_group(pg, device_type)


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """Silence DCP's "assuming the intent is to save/load in a single process" warning (that is the intent)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="torch.distributed is disabled, unavailable or uninitialized"
        )
        yield
