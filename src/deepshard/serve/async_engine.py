"""An asyncio front for :class:`~deepshard.serve.engine.ServeEngine`: one background thread owns the engine.

Callers (HTTP handlers, :class:`AsyncClient` users) never touch the engine: they send commands (add,
abort) that the engine thread executes between passes, and receive each request's outputs on their own
``asyncio.Queue``. The thread steps the engine while any request is unfinished and sleeps on an event
otherwise. A request whose consumer goes away (a cancelled task, a disconnected HTTP client) is aborted,
which frees its KV blocks before the next pass. :meth:`AsyncEngine.shutdown` with ``drain=True``
refuses new requests, lets the running ones finish, then stops the thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncGenerator, Callable
from typing import Any

from deepshard.serve.engine import RequestOutput, ServeEngine
from deepshard.serve.sampling import SamplingParams

logger = logging.getLogger(__name__)


class EngineStoppedError(RuntimeError):
    """Raised for a request sent to an engine that is draining or stopped (the server answers 503)."""


class AsyncEngine:
    """Runs ``engine`` on a daemon thread; see the module docstring."""

    def __init__(self, engine: ServeEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[
            str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput | BaseException]]
        ] = {}
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="deepshard-serve-engine", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ engine thread
    def _call(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``fn`` on the engine thread; its result (or exception) resolves the returned future."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def run() -> None:
            try:
                result = fn()
            except BaseException as exc:  # handed to the caller, the engine thread carries on
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

        self._commands.put(run)
        self._wake.set()
        return fut

    def _loop(self) -> None:
        while True:
            while True:
                try:
                    self._commands.get_nowait()()
                except queue.Empty:
                    break
            if self._stop and not self.engine.has_unfinished():
                break
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a failed pass fails the requests in it, not the server
                logger.exception("engine pass failed; aborting the running requests")
                for rid in list(self._streams):
                    self._deliver(rid, exc)
                    self.engine.abort(rid)
                continue
            for out in outputs:
                self._deliver(out.request_id, out)

    def _deliver(self, rid: str, item: RequestOutput | BaseException) -> None:
        target = self._streams.get(rid)
        if target is None:
            return
        if isinstance(item, BaseException) or item.finished:
            del self._streams[rid]
        loop, q = target
        loop.call_soon_threadsafe(q.put_nowait, item)

    # ------------------------------------------------------------------ callers
    async def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> AsyncGenerator[RequestOutput, None]:
        """Queue a request and yield its outputs as passes produce them; the last one has ``finished=True``.

        Raises ``ValueError`` for a bad request, :class:`~deepshard.serve.QueueFullError` when the queue is
        full and :class:`EngineStoppedError` while draining. Leaving the loop early aborts the request.
        """
        if not self._accepting:
            raise EngineStoppedError("the server is shutting down and accepts no new requests")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def add() -> str:
            rid = self.engine.add_request(prompt, params, request_id)
            self._streams[rid] = (loop, q)
            return rid

        rid = await self._call(add)
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread (frees its KV blocks before the next pass)."""

        def run() -> None:
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)

        self._commands.put(run)
        self._wake.set()

    @property
    def accepting(self) -> bool:
        """Whether new requests are accepted (False once a drain started)."""
        return self._accepting

    def shutdown(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the engine thread: after the unfinished requests complete (``drain``) or aborting them."""
        self._accepting = False
        if not drain:

            def abort_all() -> None:
                for rid in list(self._streams):
                    self._deliver(rid, EngineStoppedError("the server stopped"))
                    self.engine.abort(rid)

            self._commands.put(abort_all)
        self._stop = True
        self._wake.set()
        self._thread.join(timeout)


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
