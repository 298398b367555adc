"""``deepshard.serve.pipeline`` (MII's API), the async client, ``deepshard serve`` and SIGTERM draining."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from serve_tiny import ChatCharTokenizer, reference_greedy, tiny_llama

from deepshard.launcher.cli import main as cli_main
from deepshard.serve.pipeline import pipeline

TOK = ChatCharTokenizer()


def test_pipeline_greedy_and_sampled():
    model = tiny_llama()
    pipe = pipeline(model, TOK, num_kv_blocks=64, block_size=4)
    prompts = ["hello", "a longer prompt here"]
    out = pipe(prompts, max_new_tokens=7, do_sample=False)
    for p, r in zip(prompts, out, strict=True):
        assert r.token_ids == reference_greedy(model, TOK(p)["input_ids"], 7)
        assert r.generated_text == TOK.decode(r.token_ids)
        assert (r.prompt_length, r.generated_length, r.finish_reason) == (len(p), 7, "length")
    full = pipe("hello", max_new_tokens=7, do_sample=False, return_full_text=True)[0]
    assert full.generated_text == "hello" + out[0].generated_text
    a = pipe("hello", max_new_tokens=9, seed=3)[0]  # MII's default: sampling, top_p 0.9
    assert a.token_ids == pipe("hello", max_new_tokens=9, seed=3)[0].token_ids
    with pytest.raises(ValueError, match="max_new_token"):
        pipe("hello", max_new_token=3)
    pipe.engine.scheduler.allocator.check_all_free()


def test_async_client_batches_concurrent_calls():
    model = tiny_llama()
    client = pipeline(model, TOK, num_kv_blocks=64, block_size=4).async_client()

    async def main():
        whole = asyncio.gather(
            *(client.generate(p, max_new_tokens=6, do_sample=False) for p in ("ab", "cde"))
        )
        pieces = [t async for t in client.stream("ab", max_new_tokens=6, do_sample=False)]
        return await whole, "".join(pieces)

    try:
        (ra, rb), streamed = asyncio.run(main())
    finally:
        client.close()
    assert ra.token_ids == reference_greedy(model, TOK("ab")["input_ids"], 6)
    assert rb.token_ids == reference_greedy(model, TOK("cde")["input_ids"], 6)
    assert streamed == ra.generated_text
    assert client.engine.engine.scheduler.counters.passes < 6 + 6 + 6  # the calls shared passes


def test_cli_refuses_tensor_parallel():
    with pytest.raises(SystemExit, match="tensor-parallel serving"):
        cli_main(["serve", "some/model", "--tp", "2"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_running_requests(tmp_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    port = _free_port()
    script = tmp_path / "serve_tiny_server.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        torch.set_num_threads(1)
        from serve_tiny import ChatCharTokenizer, tiny_llama
        from deepshard.serve import ServeEngine
        from deepshard.serve.async_engine import AsyncEngine
        from deepshard.serve.server import run_server
        engine = ServeEngine(tiny_llama(), ChatCharTokenizer(), num_kv_blocks=128, block_size=4)
        run_server(AsyncEngine(engine), "tiny-llama", "127.0.0.1", {port}, graceful_s=60)
    """)
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = (
            time.monotonic() + 240
        )  # interpreter + torch + transformers start: ~30 s on a loaded machine
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:] if proc.stdout else ""
            assert time.monotonic() < deadline, "the server did not come up within 240 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        lines: list[str] = []
        first = threading.Event()
        body = {
            "model": "tiny-llama",
            "prompt": "drain me",
            "max_tokens": 150,
            "temperature": 0,
            "stream": True,
        }

        def consume() -> None:
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line:
                        lines.append(line)
                        first.set()

        reader = threading.Thread(target=consume)
        reader.start()
        assert first.wait(60), "no first chunk within 60 s"
        proc.send_signal(signal.SIGTERM)
        reader.join(120)
        assert not reader.is_alive()
        # uvicorn re-raises the captured SIGTERM once its graceful shutdown (and our drain) completed
        assert proc.wait(120) in (0, -signal.SIGTERM)
        log = proc.stdout.read().decode() if proc.stdout else ""
        assert "Application shutdown complete" in log, log[-2000:]
        assert lines[-1] == "data: [DONE]"
        assert len(lines) == 150 + 1  # every token of the running request arrived before the exit
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
