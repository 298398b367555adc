"""Memory shared by the ranks of one host, for data that every rank would otherwise copy over sockets.

On a gloo group whose ranks all run on one machine, moving bytes through TCP loopback costs two kernel
copies per byte plus the socket machinery. :func:`shared_storage` instead maps one shared-memory file
into every rank of the group; ranks then read and write it directly, ordering their accesses with a
gloo barrier (~70 µs here). :mod:`deepshard.zero.shared_params` uses it for the parameters.

The file is created by the group's first rank under ``/dev/shm``, opened by all, and unlinked as soon
as everyone has mapped it, so nothing is left behind even if the job is killed. Memory is only shared
when every rank of the group reports the same host (hostname and boot id) and could map the file;
otherwise ``None`` is returned and callers use collectives. The config key
``zero_optimization.host_shared_memory: false`` turns it off; the environment variable
``DEEPSHARD_HOST_SHM`` (``0``/``1``), when set, overrides the key.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from deepshard.offload.aio import align_up

logger = logging.getLogger("deepshard")

SHM_DIR = "/dev/shm"


def _host_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def enabled(configured: bool = True) -> bool:
    """Whether shared-memory windows may be used: ``configured`` (the config's
    ``zero_optimization.host_shared_memory``) unless the environment variable ``DEEPSHARD_HOST_SHM`` is
    set, which overrides it (``0`` off, anything else on)."""
    env = os.environ.get("DEEPSHARD_HOST_SHM")
    return configured if env is None else env != "0"


def shared_storage(
    group: Any, nbytes: int, usable: bool = True, configured: bool = True
) -> torch.Tensor | None:
    """``nbytes`` of memory mapped by every rank of ``group`` (collective), or ``None`` where impossible.

    ``None`` when shared memory is off (``configured``, see :func:`enabled`), the group is not gloo, has one rank, spans several hosts, a rank
    passed ``usable=False`` (its own reason to decline, e.g. tensors not on the CPU), or a rank could
    not map the file (logged at INFO).
    """
    if not (enabled(configured) and dist.is_available() and dist.is_initialized()) or nbytes <= 0:
        return None
    if "gloo" not in str(dist.get_backend(group)):
        return None
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if world == 1:
        return None
    votes: list[Any] = [None] * world
    dist.all_gather_object(votes, (_host_id(), usable), group=group)
    if len({host for host, _ in votes}) != 1 or not all(ok for _, ok in votes) or not os.path.isdir(SHM_DIR):
        return None
    name = [os.path.join(SHM_DIR, f"deepshard_window_{uuid.uuid4().hex}")] if rank == 0 else [None]
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast_object_list(name, src=src, group=group)
    path = str(name[0])
    storage: torch.Tensor | None = None
    error = ""
    if rank == 0:
        try:
            with open(path, "wb") as f:
                f.truncate(nbytes)
        except OSError as exc:
            error = f"{type(exc).__name__}: {exc}"
    dist.barrier(group=group)  # the file exists (or rank 0 failed) before anyone maps it
    if not error:
        try:
            storage = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
        except (OSError, RuntimeError) as exc:
            error = f"{type(exc).__name__}: {exc}"
    ok = torch.tensor([0 if error else 1], dtype=torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    if rank == 0:
        with contextlib.suppress(OSError):
            os.unlink(path)  # the mappings stay valid; nothing is left in /dev/shm
    if int(ok) == 0 or storage is None:
        logger.info("shared memory not available (%s); using gloo collectives", error or "another rank")
        return None
    return storage


def shared_regions(
    group: Any, nbytes: Sequence[int], usable: bool = True, align: int = 64, configured: bool = True
) -> list[torch.Tensor] | None:
    """One mapping shared by every rank of ``group`` (collective, see :func:`shared_storage`), cut into
    ``uint8`` regions of ``nbytes[i]`` bytes, each starting at a multiple of ``align`` bytes from the
    mapping's start (page-aligned with ``align=PAGE``), or ``None`` where memory cannot be shared."""
    sizes = [align_up(n, align) for n in nbytes]
    storage = shared_storage(group, sum(sizes), usable, configured)
    if storage is None:
        return None
    out: list[torch.Tensor] = []
    offset = 0
    for n, size in zip(nbytes, sizes):
        out.append(storage[offset : offset + n])
        offset += size
    return out


def release_freed_heap() -> None:
    """Give freed heap memory back to the OS (glibc's ``malloc_trim``; a no-op where unavailable).

    Tensors smaller than glibc's mmap threshold live on the heap, and freeing them does not lower the
    resident set size. Call this after moving many such tensors into shared memory, so that the
    private copies they leave behind stop counting.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_MADV_DONTNEED = 4
PAGE = 4096


def unmap_pages(tensor: torch.Tensor) -> None:
    """Drop this process's page mappings of a page-aligned range of shared memory; the data stays.

    The next access maps the pages again (a minor fault each). Used after reading another rank's
    region, so that pages this process only read once per step do not count in its resident set.
    """
    start = tensor.data_ptr()
    nbytes = tensor.numel() * tensor.element_size()
    if start % PAGE or nbytes <= 0:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(nbytes - nbytes % PAGE), _MADV_DONTNEED)
