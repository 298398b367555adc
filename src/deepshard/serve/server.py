"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) over :class:`~deepshard.serve.async_engine.AsyncEngine`.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template),
``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text). ``"stream": true`` answers
with server-sent events (``data: {chunk}`` lines, then ``data: [DONE]``).

Errors are OpenAI error objects: 400 for a malformed body or a bad value (the message names it), 404 for
an unknown model (as OpenAI), 429 when the queue is full, 503 while draining, 500 for a failed pass (the
server keeps running). A client that disconnects has its request aborted, which frees its KV blocks.
On SIGTERM uvicorn stops accepting connections and waits for the open ones; the app's shutdown then
drains the engine (running requests finish) before the process exits.

This module imports FastAPI and prometheus_client (the ``serve`` extra); the engine does not need them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from deepshard.serve.async_engine import AsyncEngine, EngineStoppedError
from deepshard.serve.engine import QueueFullError, RequestOutput
from deepshard.serve.metrics import ServerMetrics
from deepshard.serve.protocol import ChatCompletionRequest, CompletionRequest, error_body
from deepshard.serve.sampling import SamplingParams

logger = logging.getLogger(__name__)


def _error(
    status: int, message: str, kind: str = "invalid_request_error", code: str | None = None
) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code), status_code=status)


def create_app(engine: AsyncEngine, model_name: str, *, default_max_tokens: int = 16) -> FastAPI:
    """The FastAPI app serving ``engine`` as model ``model_name``; its shutdown drains the engine."""
    metrics = ServerMetrics(engine.engine)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        logger.info("shutting down: draining %d unfinished requests", engine.engine.scheduler.num_unfinished)
        await asyncio.get_running_loop().run_in_executor(None, lambda: engine.shutdown(drain=True))

    app = FastAPI(title="deepshard", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _error(400, "invalid request: " + "; ".join(parts))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("request failed")
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    @app.get("/health")
    async def health() -> Any:
        if not engine.accepting:
            return _error(503, "draining", "unavailable")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> Any:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "deepshard"}],
        }

    @app.get("/metrics")
    async def prometheus() -> Any:
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type=CONTENT_TYPE_LATEST)

    def _check(body: CompletionRequest | ChatCompletionRequest) -> SamplingParams | Any:
        if body.model != model_name:
            return _error(
                404,
                f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                code="model_not_found",
            )
        try:
            return body.sampling(default_max_tokens)
        except ValueError as exc:
            return _error(400, str(exc))

    async def _run(
        request: Request,
        endpoint: str,
        prompt: str | list[int],
        params: SamplingParams,
        stream: bool,
        chunk: Callable[[str, RequestOutput | None, str], dict[str, Any]],
        final: Callable[[str, str, RequestOutput], dict[str, Any]],
    ) -> Any:
        rid = f"{'chatcmpl' if endpoint == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        t0 = time.perf_counter()
        gen = engine.generate(prompt, params, rid)
        try:
            first = await gen.__anext__()  # a bad request or a full queue raises before anything is sent
        except ValueError as exc:
            metrics.requests.labels(endpoint, "400").inc()
            return _error(400, str(exc))
        except QueueFullError as exc:
            metrics.requests.labels(endpoint, "429").inc()
            return _error(429, str(exc), "rate_limit_error")
        except EngineStoppedError as exc:
            metrics.requests.labels(endpoint, "503").inc()
            return _error(503, str(exc), "unavailable")
        metrics.ttft.observe(time.perf_counter() - t0)

        async def outputs() -> AsyncIterator[RequestOutput]:
            yield first
            last = time.perf_counter()
            async for out in gen:
                now = time.perf_counter()
                metrics.itl.observe(now - last)
                last = now
                yield out
            metrics.e2e.observe(time.perf_counter() - t0)

        if stream:

            async def sse() -> AsyncIterator[str]:
                try:
                    opening = chunk(rid, None, "")
                    if opening:
                        yield f"data: {json.dumps(opening)}\n\n"
                    async for out in outputs():
                        yield f"data: {json.dumps(chunk(rid, out, out.new_text))}\n\n"
                    yield "data: [DONE]\n\n"
                    metrics.requests.labels(endpoint, "200").inc()
                finally:
                    await (
                        gen.aclose()
                    )  # a disconnect cancels this generator: abort the request, free its blocks

            return StreamingResponse(sse(), media_type="text/event-stream")

        async def collect() -> tuple[str, RequestOutput]:
            text, end = "", first
            async for out in outputs():
                text += out.new_text
                end = out
            return text, end

        task = asyncio.ensure_future(collect())
        while not task.done():
            await asyncio.wait([task], timeout=0.1)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await gen.aclose()
                metrics.requests.labels(endpoint, "499").inc()
                return _error(499, "client disconnected")
        text, end = task.result()
        metrics.requests.labels(endpoint, "200").inc()
        return final(rid, text, end)

    def _usage(out: RequestOutput) -> dict[str, int]:
        return {
            "prompt_tokens": out.num_prompt_tokens,
            "completion_tokens": out.num_output_tokens,
            "total_tokens": out.num_prompt_tokens + out.num_output_tokens,
        }

    def _reason(out: RequestOutput | None) -> str | None:
        if out is None or not out.finished or out.finish_reason is None:
            return None
        return out.finish_reason.value

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        params = _check(body)
        if not isinstance(params, SamplingParams):
            return params

        def chunk(rid: str, out: RequestOutput | None, text: str) -> dict[str, Any]:
            if out is None:
                return {}
            return {
                "id": rid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": _reason(out)}],
            }

        def final(rid: str, text: str, out: RequestOutput) -> dict[str, Any]:
            body = chunk(rid, out, text)
            body["usage"] = _usage(out)
            return body

        return await _run(request, "completions", body.prompt, params, body.stream, chunk, final)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        params = _check(body)
        if not isinstance(params, SamplingParams):
            return params
        tok = engine.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            return _error(400, f"the model {model_name!r} has no chat template; use /v1/completions")
        messages = [m.model_dump() for m in body.messages]
        try:
            prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # a template that rejects these messages (roles, order)
            return _error(400, f"the chat template rejected the messages: {exc}")

        def chunk(rid: str, out: RequestOutput | None, text: str) -> dict[str, Any]:
            delta = {"role": "assistant", "content": ""} if out is None else {"content": text}
            return {
                "id": rid,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": _reason(out)}],
            }

        def final(rid: str, text: str, out: RequestOutput) -> dict[str, Any]:
            return {
                "id": rid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": _reason(out),
                    }
                ],
                "usage": _usage(out),
            }

        return await _run(request, "chat", prompt, params, body.stream, chunk, final)

    return app


def run_server(
    engine: AsyncEngine, model_name: str, host: str, port: int, *, graceful_s: float = 60.0
) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn's handlers), then drain. Blocks; call from the main thread."""
    import uvicorn

    app = create_app(engine, model_name)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=int(graceful_s))


class BackgroundServer:
    """uvicorn serving ``app`` on a daemon thread (port 0: a free port); for tests, notebooks and benchmarks.

    Signals stay with the main thread (uvicorn installs handlers only there); :meth:`stop` exits it the way
    SIGTERM does (open requests finish, then the app's shutdown drains the engine).
    """

    def __init__(
        self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, *, start_timeout_s: float = 120.0
    ) -> None:
        import threading

        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="deepshard-serve-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"uvicorn did not start on {host}:{port} within {start_timeout_s} s")
            time.sleep(0.05)
        bound = self.server.servers[0].sockets[0].getsockname()
        self.url = f"http://{bound[0]}:{bound[1]}"

    def stop(self, timeout_s: float = 120.0) -> None:
        """Shut down gracefully and wait for the thread."""
        self.server.should_exit = True
        self.thread.join(timeout_s)
