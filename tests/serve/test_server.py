"""The OpenAI-compatible server on loopback: the ``openai`` client and raw HTTP (every loop bounded).

The model is the tiny random Llama with a character tokenizer, so expected texts are computed from
Hugging Face ``generate`` on the prompt alone (greedy) and decoded.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from serve_tiny import ChatCharTokenizer, reference_greedy, tiny_llama

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

from deepshard.serve import SamplingParams, ServeEngine  # noqa: E402
from deepshard.serve.async_engine import AsyncEngine  # noqa: E402
from deepshard.serve.server import BackgroundServer, create_app  # noqa: E402

MODEL = "tiny-llama"
TOK = ChatCharTokenizer()


def _start(**cfg):
    model = tiny_llama()
    engine = ServeEngine(
        model,
        TOK,
        num_kv_blocks=256,
        block_size=4,
        max_ragged_batch_size=32,
        max_ragged_sequence_count=8,
        **cfg,
    )
    server = BackgroundServer(create_app(AsyncEngine(engine), MODEL))
    return model, engine, server


@pytest.fixture(scope="module")
def served():
    model, engine, server = _start()
    yield model, engine, server.url
    server.stop()


def _expected(model, text: str, n: int) -> str:
    return TOK.decode(reference_greedy(model, TOK(text)["input_ids"], n))


def _wait(cond, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def test_models_health_metrics(served):
    _, _, url = served
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == [MODEL]
    client.completions.create(model=MODEL, prompt="warm", max_tokens=3, temperature=0)
    text = httpx.get(f"{url}/metrics").text
    assert "deepshard_scheduler_passes_total" in text
    assert "deepshard_time_to_first_token_seconds_bucket" in text
    assert "deepshard_kv_blocks_total 256.0" in text


def test_completions_match_generate_alone(served):
    model, engine, url = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    out = client.completions.create(model=MODEL, prompt="the quick brown", max_tokens=12, temperature=0)
    assert out.choices[0].text == _expected(model, "the quick brown", 12)
    assert out.choices[0].finish_reason == "length"
    assert out.usage.prompt_tokens == 15 and out.usage.completion_tokens == 12
    chunks = client.completions.create(
        model=MODEL, prompt="the quick brown", max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    stopped = client.completions.create(
        model=MODEL, prompt="the quick brown", max_tokens=12, temperature=0, stop=[out.choices[0].text[5:7]]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert (
        stopped.choices[0].text == out.choices[0].text[: out.choices[0].text.find(out.choices[0].text[5:7])]
    )


def test_chat_completions(served):
    model, _, url = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    out = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    prompt = TOK.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert out.choices[0].message.content == _expected(model, prompt, 8)
    assert out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0, stream=True
    )
    parts = list(stream)
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == out.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        (b'{"model": "tiny-llama", "prompt": "x", ', 400, "JSON"),
        (b'{"model": "gpt-4", "prompt": "x"}', 404, "gpt-4"),
        (b'{"model": "tiny-llama", "prompt": "x", "max_tokens": -3}', 400, "max_tokens"),
        (b'{"model": "tiny-llama", "prompt": "' + b"y" * 600 + b'", "max_tokens": 4}', 400, "context"),
        (b'{"model": "tiny-llama", "prompt": "x", "n": 2}', 400, "n=2"),
        (b'{"model": "tiny-llama", "prompt": "x", "logprobs": 3}', 400, "logprobs"),
        (b'{"model": "tiny-llama"}', 400, "prompt"),
        (b'{"model": "tiny-llama", "prompt": "x", "temperature": "hot"}', 400, "temperature"),
    ],
    ids=[
        "malformed-json",
        "unknown-model",
        "negative-max-tokens",
        "over-long-prompt",
        "n",
        "logprobs",
        "missing-prompt",
        "bad-type",
    ],
)
def test_bad_requests(served, body, status, needle):
    _, engine, url = served
    r = httpx.post(f"{url}/v1/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]
    assert httpx.get(f"{url}/health").status_code == 200  # the server survives
    engine.scheduler.allocator.check_all_free()


def test_disconnect_mid_stream_frees_blocks(served):
    _, engine, url = served
    aborted = engine.scheduler.counters.aborted
    body = {"model": MODEL, "prompt": "a long one", "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as client, client.stream("POST", f"{url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [json.loads(line[6:]) for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
        assert got and got[0]["object"] == "text_completion"
        assert engine.scheduler.allocator.num_used > 0
    _wait(lambda: engine.scheduler.counters.aborted == aborted + 1, "the aborted request")
    _wait(lambda: engine.scheduler.allocator.num_used == 0, "the KV blocks to be freed")


def test_full_queue_answers_429():
    _, engine, server = _start(max_tracked_sequences=2)
    try:
        body = {"model": MODEL, "prompt": "busy", "max_tokens": 300, "temperature": 0, "stream": True}
        url = f"{server.url}/v1/completions"
        with (
            httpx.Client(timeout=30) as client,
            client.stream("POST", url, json=body) as a,
            client.stream("POST", url, json=body) as b,
        ):
            assert a.status_code == b.status_code == 200
            r = client.post(url, json={**body, "stream": False})
            assert r.status_code == 429 and "max_tracked_sequences" in r.json()["error"]["message"]
        _wait(lambda: engine.scheduler.allocator.num_used == 0, "the KV blocks to be freed")
    finally:
        server.stop()


def test_async_engine_cancel_and_drain():
    import asyncio

    engine = ServeEngine(tiny_llama(), TOK, num_kv_blocks=128, block_size=4)
    aeng = AsyncEngine(engine)

    async def main() -> tuple[list[int], int]:
        async def first_two() -> None:
            n = 0
            async for _ in aeng.generate("xyz", SamplingParams(max_tokens=300)):
                n += 1
                if n == 2:
                    break

        async def whole() -> list[int]:
            ids: list[int] = []
            async for out in aeng.generate("abc", SamplingParams(max_tokens=20)):
                ids += out.new_token_ids
            return ids

        ids, _ = await asyncio.gather(whole(), first_two())
        return ids, engine.scheduler.counters.aborted

    ids, aborted = asyncio.run(main())
    assert ids == reference_greedy(engine.hf_model, TOK("abc")["input_ids"], 20)
    assert aborted == 1
    aeng.shutdown(drain=True, timeout=30)
    assert not aeng._thread.is_alive()
    engine.scheduler.allocator.check_all_free()
    torch.testing.assert_close(torch.tensor(engine.scheduler.allocator.num_used), torch.tensor(0))
