"""A multi-process test harness: spawn N gloo ranks once, then run many test functions on them.

Spawning processes and creating a process group costs seconds; a test suite that does it per test
spends most of its time there. :class:`DistributedHarness` starts the ranks once and keeps them
waiting for work. ``harness.run(fn, *args)`` pickles ``fn`` (a module-level function) and its
arguments, runs ``fn(*args)`` on every rank, and returns the per-rank results in rank order.

A rank that raises is reported with its traceback; the other ranks get a few seconds to finish and,
if they are stuck in a collective that will never complete, the harness is torn down and restarted
on the next call. Every call has a timeout, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

_STRAGGLER_GRACE_S = 10.0
_POLL_S = 0.5


class RankError(RuntimeError):
    """A function raised on one or more ranks; the message holds each failing rank's traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, backend: str, threads: int, tasks: Any, results: Any) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": str(threads),
        }
    )
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=120),
    )
    while True:
        message = tasks.get()
        if message is None:
            break
        task_id, path, payload = message
        for entry in path:
            if entry not in sys.path:
                sys.path.append(entry)
        try:
            fn, args, kwargs = pickle.loads(payload)
            value = fn(*args, **kwargs)
            results.put((task_id, rank, True, pickle.dumps(value)))
        except BaseException:  # report everything, including assertion failures, to the parent
            results.put((task_id, rank, False, traceback.format_exc()))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


class DistributedHarness:
    """``world_size`` spawned ranks in one gloo process group, reused across calls to :meth:`run`."""

    def __init__(self, world_size: int, backend: str = "gloo", timeout_s: float = 180.0, threads_per_rank: int = 1):
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        self.world_size = world_size
        self.backend = backend
        self.timeout_s = timeout_s
        self.threads_per_rank = threads_per_rank
        self._ctx = mp.get_context("spawn")
        self._procs: list[Any] = []
        self._tasks: list[Any] = []
        self._results: Any = None
        self._next_id = 0

    @property
    def alive(self) -> bool:
        """Whether all ranks are running."""
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def start(self) -> None:
        """Spawn the ranks (done lazily by :meth:`run`)."""
        if self.alive:
            return
        self.close()
        port = free_port()
        self._results = self._ctx.Queue()
        self._tasks = [self._ctx.Queue() for _ in range(self.world_size)]
        self._procs = [
            self._ctx.Process(
                target=_worker,
                args=(r, self.world_size, port, self.backend, self.threads_per_rank, self._tasks[r], self._results),
                daemon=True,
            )
            for r in range(self.world_size)
        ]
        for proc in self._procs:
            proc.start()

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float | None = None, **kwargs: Any) -> list[Any]:
        """Run ``fn(*args, **kwargs)`` on every rank; return the results in rank order.

        Raises :class:`RankError` if any rank raised, and :class:`TimeoutError` (after tearing the
        ranks down) if some rank did not answer within ``timeout_s``.
        """
        self.start()
        self._next_id += 1
        task_id = self._next_id
        payload = pickle.dumps((fn, args, kwargs))
        for q in self._tasks:
            q.put((task_id, list(sys.path), payload))
        results: dict[int, Any] = {}
        errors: dict[int, str] = {}
        limit = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        while len(results) + len(errors) < self.world_size:
            if errors:
                deadline = min(deadline, time.monotonic() + _STRAGGLER_GRACE_S)
            try:
                got_id, rank, ok, data = self._results.get(timeout=_POLL_S)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive()]
                if not dead and time.monotonic() < deadline:
                    continue
                missing = sorted(set(range(self.world_size)) - set(results) - set(errors))
                codes = {r: self._procs[r].exitcode for r in dead}
                self.close()
                if errors:
                    break
                what = f"ranks {sorted(codes)} exited (exit codes {codes})" if dead else f"no answer within {limit:.0f}s"
                raise TimeoutError(
                    f"{getattr(fn, '__name__', fn)} did not finish on ranks {missing}: {what} "
                    "(a crash, a hang, or a collective that some rank never reached); the ranks were restarted."
                ) from None
            if got_id != task_id:
                continue  # a late answer to an earlier, timed-out task
            if ok:
                results[rank] = pickle.loads(data)
            else:
                errors[rank] = data
        if errors:
            # A failed rank may have left collectives unmatched: start clean next time.
            self.close()
            detail = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise RankError(f"{getattr(fn, '__name__', fn)} failed on ranks {sorted(errors)}:\n{detail}")
        return [results[r] for r in range(self.world_size)]

    def close(self) -> None:
        """Stop the ranks (politely, then by force)."""
        for q in self._tasks:
            with contextlib.suppress(Exception):
                q.put(None)
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._procs = []
        self._tasks = []

    def __enter__(self) -> DistributedHarness:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
