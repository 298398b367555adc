"""Swap space on the NVMe tier: named slots plus a bounded pool of aligned staging buffers.

A :class:`SwapSpace` is what a user of the NVMe tier holds: it stores bytes under keys and does not
know what they are for. Transfers go through page-aligned buffers of one size taken from a pool of
at most ``buffer_count``, so the memory the tier uses on the host is bounded whatever the model size:

* :meth:`SwapSpace.read` takes a buffer and fills it from one or more slots in the background
  (:class:`PendingRead`); the caller waits, uses the bytes, and gives the buffer back (or writes it);
* :meth:`SwapSpace.write` writes a buffer's regions to their slots in the background and returns the
  buffer to the pool when the write is done. When the pool is empty, taking a buffer waits for the
  oldest write in flight.

Errors of background writes are not lost: the next :meth:`take`, :meth:`flush` or :meth:`close`
raises the first one (an :class:`~deepshard.offload.aio.AIOError` naming the file and offset), so a
run stops at the step whose state could not be written.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future

import torch

from deepshard.offload.aio import AsyncIO, SwapFiles, align_up, aligned_empty

logger = logging.getLogger("deepshard")

Region = tuple[str, int]  # (slot key, bytes): regions of a buffer, laid out back to back, each aligned


def region_offsets(regions: Sequence[Region]) -> list[int]:
    """Byte offset of each region in a staging buffer (every region starts page-aligned)."""
    out, at = [], 0
    for _, nbytes in regions:
        out.append(at)
        at += align_up(nbytes)
    return out


def regions_nbytes(regions: Sequence[Region]) -> int:
    """Bytes of staging buffer ``regions`` need."""
    return sum(align_up(n) for _, n in regions)


class PendingRead:
    """A buffer being filled from the tier; :meth:`wait` returns it once the bytes are there."""

    def __init__(self, buffer: torch.Tensor, futures: list[Future[None]]) -> None:
        self.buffer = buffer
        self._futures = futures

    def done(self) -> bool:
        """Whether every region has arrived (or failed)."""
        return all(f.done() for f in self._futures)

    def wait(self) -> torch.Tensor:
        """Block until read; raise the read's error if it failed."""
        for f in self._futures:
            f.result()
        return self.buffer


class SwapSpace:
    """Slots under ``nvme_path`` and a pool of ``buffer_count`` aligned buffers of ``buffer_bytes``."""

    def __init__(
        self,
        nvme_path: str | os.PathLike[str],
        needed_bytes: int,
        buffer_bytes: int,
        buffer_count: int,
        block_size: int = 1 << 20,
        queue_depth: int = 8,
        thread_count: int = 1,
        what: str = "offload",
        engine: AsyncIO | None = None,
    ) -> None:
        """``engine``: an IO engine to share with another swap space (one queue for the whole disk: reads
        and writes then reach it in order instead of interleaving, which costs bandwidth on most devices)."""
        if buffer_count < 1:
            raise ValueError(f"the NVMe tier of {what} needs at least one staging buffer, got buffer_count={buffer_count}")
        self.what = what
        self._own_engine = engine is None
        self.engine = engine or AsyncIO(block_size=block_size, queue_depth=queue_depth, thread_count=thread_count)
        try:
            self.files = SwapFiles(nvme_path, needed_bytes, engine=self.engine, direct=True, sync=True)
        except Exception:
            if self._own_engine:
                self.engine.close()
            raise
        self.buffer_bytes = align_up(max(buffer_bytes, 1))
        self.buffer_count = buffer_count
        self._free: list[torch.Tensor] = []
        self._allocated = 0
        self._writes: deque[tuple[Future[None], torch.Tensor]] = deque()
        self.slot_bytes = 0

    # ------------------------------------------------------------------ slots and buffers
    def slot(self, key: str, nbytes: int) -> None:
        """Create slot ``key`` of ``nbytes`` (rounded up to the alignment)."""
        self.slot_bytes += self.files.slot(key, nbytes)

    @property
    def resident_bytes(self) -> int:
        """Host bytes the pool's buffers hold now."""
        return self._allocated * self.buffer_bytes

    def can_take(self) -> bool:
        """Whether :meth:`take` would succeed now or after waiting for a write (not for a read)."""
        return bool(self._free) or self._allocated < self.buffer_count or bool(self._writes)

    def take(self, nbytes: int) -> torch.Tensor:
        """A free staging buffer of at least ``nbytes``; waits for the oldest write when none is free."""
        if nbytes > self.buffer_bytes:
            raise ValueError(
                f"{self.what}: a transfer of {nbytes} bytes does not fit the NVMe staging buffers of "
                f"{self.buffer_bytes} bytes"
            )
        self._reclaim(block=False)
        if not self._free and self._allocated < self.buffer_count:
            self._allocated += 1
            return aligned_empty(self.buffer_bytes)
        while not self._free:
            if not self._writes:
                raise RuntimeError(
                    f"{self.what}: all {self.buffer_count} NVMe staging buffers are in use and none is being "
                    "written; raise buffer_count"
                )
            self._reclaim(block=True)
        return self._free.pop()

    def give(self, buffer: torch.Tensor) -> None:
        """Return a buffer that was read (and not written) to the pool."""
        self._free.append(buffer)

    def _reclaim(self, block: bool) -> None:
        """Return buffers of finished writes to the pool (``block``: wait for the oldest); raise their errors."""
        while self._writes and (block or self._writes[0][0].done()):
            future, buffer = self._writes.popleft()
            self._free.append(buffer)
            future.result()  # raises AIOError when the write failed
            block = False

    # ------------------------------------------------------------------ transfers
    def read(self, regions: Sequence[Region]) -> PendingRead:
        """Fill a staging buffer from ``regions`` (slot key, bytes), laid out as :func:`region_offsets`."""
        buffer = self.take(regions_nbytes(regions))
        futures = [
            self.files.read(key, buffer[at : at + align_up(n)]) for (key, n), at in zip(regions, region_offsets(regions))
        ]
        return PendingRead(buffer, futures)

    def write(self, regions: Sequence[Region], buffer: torch.Tensor) -> None:
        """Write ``buffer``'s regions to their slots in the background; the buffer returns to the pool after."""
        futures = [
            self.files.write(key, buffer[at : at + align_up(n)]) for (key, n), at in zip(regions, region_offsets(regions))
        ]
        done: Future[None] = Future()
        left = [len(futures)]
        lock = threading.Lock()

        def one(f: Future[None]) -> None:
            exc = f.exception()
            with lock:
                left[0] -= 1
                if done.done():
                    return
                if exc is not None:
                    done.set_exception(exc)
                elif left[0] == 0:
                    done.set_result(None)

        for f in futures:
            f.add_done_callback(one)
        if not futures:
            done.set_result(None)
        self._writes.append((done, buffer))

    def flush(self) -> None:
        """Wait for every write in flight; raise the first error."""
        while self._writes:
            self._reclaim(block=True)

    def trim(self) -> None:
        """Free the pool's idle buffers (they are allocated again on demand)."""
        self.flush()
        self._allocated -= len(self._free)
        self._free.clear()

    @property
    def bytes_read(self) -> int:
        """Bytes read from the tier so far."""
        return self.engine.bytes_read

    @property
    def bytes_written(self) -> int:
        """Bytes written to the tier so far."""
        return self.engine.bytes_written

    def close(self) -> None:
        """Finish writes, close and remove the files."""
        try:
            self.flush()
        finally:
            self.files.close()
            if self._own_engine:
                self.engine.close()
