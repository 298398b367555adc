"""Asynchronous file IO for the NVMe tier: aligned buffers, background threads, ``O_DIRECT`` where possible.

:class:`AsyncIO` moves tensors between memory and files in the background: each request is split
into ``block_size`` pieces that a small pool of threads (``thread_count``) reads or writes with
``os.preadv`` / ``os.pwritev``, looping over short transfers; at most ``queue_depth`` pieces are in
flight and the rest wait in a queue, so submitting never blocks the caller. A request returns a :class:`concurrent.futures.Future`; an IO error surfaces from it as an
:class:`AIOError` naming the file, the offset and the operation. The threads release the GIL during the
system calls, so transfers overlap with computation (PyTorch's kernels release it too).

``O_DIRECT`` bypasses the page cache, so that what is measured is the disk and the state really
leaves RAM. It needs the buffer address, the file offset and the length aligned to the device's block
size: :func:`aligned_empty` allocates page-aligned tensors (an anonymous ``mmap``; ``torch.empty``
gives no such guarantee) and :class:`SwapFiles` keeps every slot a multiple of :data:`ALIGN`. Where
the filesystem refuses ``O_DIRECT`` (tmpfs, some overlay filesystems) the files are opened normally,
with a warning, and writes are flushed with ``fdatasync`` when ``sync=True``.

:class:`SwapFiles` owns the files of one run under ``nvme_path`` (checked for existence, writability and
free space before anything is written, see :func:`check_nvme_path`) and removes them on ``close()``
and at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import mmap
import os
import shutil
import threading
import uuid
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger("deepshard")

ALIGN = 4096  # bytes: page size, and a multiple of every block device's logical block size


class AIOError(OSError):
    """A read or write of the NVMe tier failed."""


def align_up(nbytes: int, to: int = ALIGN) -> int:
    """``nbytes`` rounded up to a multiple of ``to``."""
    return -(-nbytes // to) * to


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A ``uint8`` tensor of ``align_up(nbytes)`` bytes whose address is page-aligned (for ``O_DIRECT``)."""
    size = max(align_up(nbytes), ALIGN)
    buf = mmap.mmap(-1, size)
    tensor = torch.frombuffer(buf, dtype=torch.uint8)  # keeps ``buf`` alive through the buffer protocol
    assert tensor.data_ptr() % ALIGN == 0
    return tensor


def check_nvme_path(path: str | os.PathLike[str], needed_bytes: int, what: str = "offload") -> Path:
    """The directory for swap files, checked: it exists (created when missing, as DeepSpeed does), is
    writable and has ``needed_bytes`` free."""
    root = Path(path)
    if not root.exists() and not root.is_symlink():
        try:
            root.mkdir(parents=True, exist_ok=True)  # ranks sharing the path may race; exist_ok settles it
        except OSError as exc:
            raise ValueError(
                f"nvme_path {str(root)!r} for {what} does not exist and could not be created "
                f"({exc.strerror or exc}); create it or fix the path."
            ) from exc
        logger.info("created nvme_path %s for %s", root, what)
    if not root.is_dir():
        raise ValueError(f"nvme_path {str(root)!r} for {what} is not a directory; point it at a directory.")
    if not os.access(root, os.W_OK | os.X_OK):
        raise ValueError(f"nvme_path {str(root)!r} for {what} is not writable by this process.")
    free = shutil.disk_usage(root).free
    if free < needed_bytes:
        raise ValueError(
            f"nvme_path {str(root)!r} has {free / 2**30:.2f} GiB free, but {what} needs {needed_bytes / 2**30:.2f} GiB; "
            "free space there or point nvme_path at a larger disk."
        )
    return root


class AsyncIO:
    """Background reads and writes of tensors at offsets of open files."""

    def __init__(self, block_size: int = 1 << 20, queue_depth: int = 8, thread_count: int = 1) -> None:
        if block_size <= 0 or block_size % ALIGN:
            raise ValueError(f"aio block_size must be a positive multiple of {ALIGN}, got {block_size}")
        if queue_depth <= 0 or thread_count <= 0:
            raise ValueError(f"aio queue_depth and thread_count must be positive, got {queue_depth}, {thread_count}")
        self.block_size = block_size
        self.queue_depth = queue_depth
        self._pool = ThreadPoolExecutor(max_workers=thread_count, thread_name_prefix="deepshard-aio")
        self._queue: deque[tuple[str, int, int, memoryview, str, Future[None]]] = deque()
        self._inflight = 0
        self._cond = threading.Condition()
        self.bytes_read = 0
        self.bytes_written = 0
        self._lock = threading.Lock()

    def read(self, fd: int, offset: int, tensor: torch.Tensor, name: str = "") -> Future[None]:
        """Fill ``tensor`` (contiguous, on the host) from ``fd`` at ``offset``, in the background."""
        return self._submit("read", fd, offset, tensor, name)

    def write(self, fd: int, offset: int, tensor: torch.Tensor, name: str = "") -> Future[None]:
        """Write ``tensor``'s bytes to ``fd`` at ``offset``, in the background."""
        return self._submit("write", fd, offset, tensor, name)

    def _submit(self, op: str, fd: int, offset: int, tensor: torch.Tensor, name: str) -> Future[None]:
        if not tensor.is_contiguous() or tensor.device.type != "cpu":
            raise ValueError(f"aio {op} needs a contiguous host tensor, got {tensor.device} contiguous={tensor.is_contiguous()}")
        view = _bytes_of(tensor)
        pieces = [(offset + start, view[start : start + self.block_size]) for start in range(0, len(view), self.block_size)]
        futures = [self._piece(op, fd, at, piece, name) for at, piece in pieces]
        return _all_of(futures, keep=tensor)

    def _piece(self, op: str, fd: int, offset: int, piece: memoryview, name: str) -> Future[None]:
        """Queue one piece; it starts once fewer than ``queue_depth`` pieces are in flight (never blocks)."""
        out: Future[None] = Future()
        with self._cond:
            self._queue.append((op, fd, offset, piece, name, out))
            self._pump()
        return out

    def _pump(self) -> None:
        """Hand queued pieces to the threads while fewer than ``queue_depth`` are in flight (lock held)."""
        while self._inflight < self.queue_depth and self._queue:
            item = self._queue.popleft()
            self._inflight += 1
            self._pool.submit(self._run, *item)

    def _run(self, op: str, fd: int, offset: int, piece: memoryview, name: str, out: Future[None]) -> None:
        error: BaseException | None = None
        try:
            self._transfer(op, fd, offset, piece, name)
        except BaseException as exc:  # noqa: BLE001 - handed to the request's future
            error = exc
        with self._cond:
            self._inflight -= 1
            self._pump()
            self._cond.notify_all()
        if error is not None:
            out.set_exception(error)
        else:
            out.set_result(None)

    def _transfer(self, op: str, fd: int, offset: int, piece: memoryview, name: str) -> None:
        done = 0
        call: Callable[[int, list[memoryview], int], int] = os.preadv if op == "read" else os.pwritev
        while done < len(piece):
            try:
                n = call(fd, [piece[done:]], offset + done)
            except OSError as exc:
                raise AIOError(
                    exc.errno, f"{op} of {len(piece) - done} bytes at offset {offset + done} of {name or f'fd {fd}'} "
                    f"failed: {exc.strerror}"
                ) from exc
            if n == 0:
                raise AIOError(
                    0, f"{op} at offset {offset + done} of {name or f'fd {fd}'} hit the end of the file "
                    f"({done} of {len(piece)} bytes transferred)"
                )
            done += n
        with self._lock:
            if op == "read":
                self.bytes_read += done
            else:
                self.bytes_written += done

    def close(self) -> None:
        """Finish queued transfers and stop the threads."""
        with self._cond:
            self._cond.wait_for(lambda: not self._queue and self._inflight == 0)
        self._pool.shutdown(wait=True)


def _all_of(futures: list[Future[None]], keep: torch.Tensor) -> Future[None]:
    """One future that completes when all ``futures`` have (with the first error); holds ``keep`` alive."""
    out: Future[None] = Future()
    if not futures:
        out.set_result(None)
        return out
    left = [len(futures)]
    lock = threading.Lock()

    def one_done(f: Future[None]) -> None:
        with lock:
            left[0] -= 1
            finished = left[0] == 0
        if finished and not out.done():
            errors = [x.exception() for x in futures if x.exception() is not None]
            if errors:
                out.set_exception(errors[0])
            else:
                out.set_result(None)

    out.keep = keep  # type: ignore[attr-defined]  # the buffer must outlive the transfer
    for f in futures:
        f.add_done_callback(one_done)
    return out


class SwapFiles:
    """Named fixed-size slots in files under one directory, read and written through :class:`AsyncIO`.

    Each slot is its own file, sized to a multiple of :data:`ALIGN`. ``direct`` (default) opens files
    with ``O_DIRECT`` where the filesystem allows it. Files are removed by :meth:`close` and at exit.
    """

    def __init__(
        self,
        nvme_path: str | os.PathLike[str],
        needed_bytes: int = 0,
        engine: AsyncIO | None = None,
        direct: bool = True,
        sync: bool = False,
    ) -> None:
        root = check_nvme_path(nvme_path, needed_bytes)
        self.dir = root / f"deepshard_swap_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.dir.mkdir()
        self.engine = engine or AsyncIO()
        self._own_engine = engine is None
        self.sync = sync
        self.direct = direct and hasattr(os, "O_DIRECT") and self._direct_works()
        if direct and not self.direct:
            logger.warning("O_DIRECT is not supported under %s: swap files go through the page cache", root)
        self._slots: dict[str, tuple[int, int]] = {}  # key -> (fd, bytes)
        self._finalizer = weakref.finalize(self, _remove_dir, str(self.dir), self._slots)
        atexit.register(self._finalizer)

    def _direct_works(self) -> bool:
        probe = self.dir / "probe"
        try:
            fd = os.open(probe, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)  # type: ignore[attr-defined]
        except OSError:
            return False
        try:
            buf = aligned_empty(ALIGN)
            os.pwritev(fd, [_bytes_of(buf)], 0)
            return True
        except OSError:
            return False
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)

    def slot(self, key: str, nbytes: int) -> int:
        """Create the slot ``key`` of at least ``nbytes`` (rounded up to :data:`ALIGN`); its file size."""
        if key in self._slots:
            raise ValueError(f"swap slot {key!r} exists already")
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if self.direct else 0)  # type: ignore[attr-defined]
        size = align_up(max(nbytes, 1))
        fd = os.open(self.dir / _file_name(key), flags, 0o600)
        os.ftruncate(fd, size)
        self._slots[key] = (fd, size)
        return size

    def _fd(self, key: str, tensor: torch.Tensor) -> int:
        try:
            fd, size = self._slots[key]
        except KeyError:
            raise KeyError(f"no swap slot {key!r}; create it with slot() first") from None
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes > size:
            raise ValueError(f"swap slot {key!r} holds {size} bytes, the tensor has {nbytes}")
        if self.direct and (tensor.data_ptr() % ALIGN or nbytes % ALIGN):
            raise ValueError(
                f"swap slot {key!r} is opened with O_DIRECT: the tensor must be page-aligned and a multiple of "
                f"{ALIGN} bytes (allocate it with deepshard.offload.aio.aligned_empty), got address "
                f"{tensor.data_ptr():#x} and {nbytes} bytes"
            )
        return fd

    def write(self, key: str, tensor: torch.Tensor) -> Future[None]:
        """Write ``tensor`` into slot ``key`` in the background."""
        fd = self._fd(key, tensor)
        future = self.engine.write(fd, 0, tensor, name=str(self.dir / _file_name(key)))
        if not (self.sync and not self.direct):
            return future
        flushed: Future[None] = Future()  # done once the data is on the disk, not just in the page cache

        def flush(f: Future[None]) -> None:
            try:
                f.result()
                os.fdatasync(fd)
                flushed.set_result(None)
            except OSError as exc:
                flushed.set_exception(exc)

        future.add_done_callback(flush)
        return flushed

    def read(self, key: str, tensor: torch.Tensor) -> Future[None]:
        """Fill ``tensor`` from slot ``key`` in the background."""
        return self.engine.read(self._fd(key, tensor), 0, tensor, name=str(self.dir / _file_name(key)))

    def close(self) -> None:
        """Wait for transfers, close and remove the files."""
        if self._own_engine:
            self.engine.close()
        self._finalizer()


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous host tensor's memory (any dtype)."""
    if tensor.numel() == 0:
        return memoryview(bytearray())
    array: Any = tensor.reshape(-1).view(torch.uint8).numpy()
    return memoryview(array)


def _file_name(key: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key) + ".swp"


def _remove_dir(path: str, slots: dict[str, tuple[int, int]]) -> None:
    for fd, _ in slots.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    slots.clear()
    shutil.rmtree(path, ignore_errors=True)
