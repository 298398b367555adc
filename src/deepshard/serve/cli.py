"""``deepshard serve MODEL_PATH --port N``: load a model, start the engine, serve OpenAI's HTTP API."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    """The ``deepshard serve`` argument parser."""
    p = argparse.ArgumentParser(prog="deepshard serve", description=__doc__)
    p.add_argument("model_path", help="a Hugging Face model directory or hub name, or a .gguf file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (only 1 is implemented)")
    p.add_argument(
        "--served-model-name", default=None, help="the model id clients send (default: the path's name)"
    )
    p.add_argument("--max-ragged-batch-size", type=int, default=768, help="tokens per forward pass")
    p.add_argument("--max-ragged-sequence-count", type=int, default=512, help="sequences per forward pass")
    p.add_argument("--max-tracked-sequences", type=int, default=2048, help="requests in flight before 429")
    p.add_argument("--num-kv-blocks", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-context", type=int, default=8192)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument(
        "--graceful-shutdown-s", type=float, default=60.0, help="how long SIGTERM waits for requests"
    )
    return p


def main(argv: list[str]) -> int:
    """Entry point of ``deepshard serve``; returns the exit code."""
    args = parser().parse_args(argv)
    if args.tp != 1:
        raise SystemExit(
            f"deepshard serve: --tp {args.tp}: tensor-parallel serving (AutoTP) is not implemented yet; use --tp 1"
        )
    from deepshard.serve.async_engine import AsyncEngine
    from deepshard.serve.engine import ServeEngine
    from deepshard.serve.pipeline import load_model
    from deepshard.serve.server import run_server

    model, tokenizer = load_model(args.model_path)
    engine = ServeEngine(
        model,
        tokenizer,
        max_ragged_batch_size=args.max_ragged_batch_size,
        max_ragged_sequence_count=args.max_ragged_sequence_count,
        max_tracked_sequences=args.max_tracked_sequences,
        num_kv_blocks=args.num_kv_blocks,
        block_size=args.block_size,
        max_context=args.max_context,
        enable_prefix_caching=not args.no_prefix_caching,
    )
    name = args.served_model_name or Path(str(args.model_path).rstrip("/")).name
    run_server(AsyncEngine(engine), name, args.host, args.port, graceful_s=args.graceful_shutdown_s)
    return 0
