"""Serving: continuous batching with Dynamic SplitFuse over a paged KV cache, a MII-like ``pipeline``,
an async client and an OpenAI-compatible HTTP server (``deepshard serve``). See docs/serving.md.
"""

from deepshard.serve.config import ServeConfig, load_serve_config
from deepshard.serve.engine import QueueFullError, RequestOutput, ServeEngine
from deepshard.serve.sampling import SamplingParams

__all__ = [
    "QueueFullError",
    "RequestOutput",
    "SamplingParams",
    "ServeConfig",
    "ServeEngine",
    "load_serve_config",
]
