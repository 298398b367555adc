"""DeepSpeed-MII's Python API over the serving engine: ``pipeline(model_or_path)`` and an async client.

``pipe = deepshard.serve.pipeline("path/to/model")`` then ``pipe(["DeepSpeed is", "Paris is"],
max_new_tokens=32)`` returns one :class:`Response` per prompt, the prompts batched continuously. The
generation keywords are MII's with MII's defaults (``do_sample=True``, ``top_p=0.9``,
``temperature=1.0``, ``top_k=0``, ``return_full_text=False``, ``ignore_eos=False``, ``stop=[]``);
``max_new_tokens`` defaults to 128 and ``seed`` makes sampling reproducible. :class:`AsyncClient` is the
same over :class:`~deepshard.serve.async_engine.AsyncEngine` for asyncio code, with streaming.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepshard.serve.async_engine import AsyncEngine
from deepshard.serve.config import ServeConfig
from deepshard.serve.engine import ServeEngine
from deepshard.serve.sampling import SamplingParams

_GENERATE_KEYS = (
    "max_new_tokens",
    "do_sample",
    "temperature",
    "top_k",
    "top_p",
    "stop",
    "ignore_eos",
    "return_full_text",
    "seed",
    "min_new_tokens",
)


@dataclass(frozen=True)
class Response:
    """MII's response: the generated text (prompt prepended with ``return_full_text``), lengths, reason."""

    generated_text: str
    prompt_length: int
    generated_length: int
    finish_reason: str
    token_ids: list[int]

    def __str__(self) -> str:
        return self.generated_text


def sampling_params(kwargs: Mapping[str, Any]) -> tuple[SamplingParams, bool]:
    """MII generate keywords -> ``(SamplingParams, return_full_text)``; ``ValueError`` names an unknown key."""
    unknown = sorted(set(kwargs) - set(_GENERATE_KEYS))
    if unknown:
        raise ValueError(f"unknown generation keyword(s) {unknown}; accepted: {', '.join(_GENERATE_KEYS)}")
    if kwargs.get("min_new_tokens", 0):
        raise ValueError("min_new_tokens > 0 is not implemented by deepshard.serve; leave it at 0")
    stop = kwargs.get("stop", ())
    sample = bool(kwargs.get("do_sample", True))
    params = SamplingParams(
        max_tokens=int(kwargs.get("max_new_tokens", 128)),
        temperature=float(kwargs.get("temperature", 1.0)) if sample else 0.0,
        top_k=int(kwargs.get("top_k", 0)),
        top_p=float(kwargs.get("top_p", 0.9)) if sample else 1.0,
        seed=kwargs.get("seed"),
        stop=(stop,) if isinstance(stop, str) else tuple(stop),
        ignore_eos=bool(kwargs.get("ignore_eos", False)),
    )
    return params, bool(kwargs.get("return_full_text", False))


def load_model(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """A Hugging Face causal LM and its tokenizer from a directory, a hub name, or a ``.gguf`` file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ValueError(f"GGUF file {str(p)!r} does not exist")
        kw: dict[str, Any] = {"gguf_file": p.name}
        where = str(p.parent)
    else:
        kw, where = {}, str(path)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **kw).eval()
    tokenizer = AutoTokenizer.from_pretrained(where, **kw)
    return model, tokenizer


class Pipeline:
    """A callable over a list of prompts (see the module docstring); wraps one :class:`ServeEngine`."""

    def __init__(self, engine: ServeEngine) -> None:
        self.engine = engine

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (``None`` when the pipeline was built from a bare model)."""
        return self.engine.tokenizer

    def __call__(self, prompts: str | list[str] | list[list[int]], **kwargs: Any) -> list[Response]:
        """Generate for every prompt (a string, or a list of strings / token-id lists); one response each."""
        items: list[str | list[int]] = [prompts] if isinstance(prompts, str) else list(prompts)
        params, full = sampling_params(kwargs)
        seqs = self.engine.generate(items, params)
        return [
            Response(
                ((p if isinstance(p, str) else "") + s.text) if full else s.text,
                s.prompt_len,
                len(s.output),
                s.finish_reason.value if s.finish_reason is not None else "length",
                s.output,
            )
            for p, s in zip(items, seqs, strict=True)
        ]

    def async_client(self) -> AsyncClient:
        """An :class:`AsyncClient` over this pipeline's engine (which it then owns: do not call both)."""
        return AsyncClient(AsyncEngine(self.engine))


class AsyncClient:
    """asyncio access to an :class:`AsyncEngine`: whole responses (``generate``) or text chunks (``stream``)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def generate(self, prompt: str | list[int], **kwargs: Any) -> Response:
        """Generate for one prompt; concurrent calls are batched together by the engine."""
        params, full = sampling_params(kwargs)
        text, ids, last = "", [], None
        async for out in self.engine.generate(prompt, params):
            text += out.new_text
            ids += out.new_token_ids
            last = out
        assert last is not None
        reason = last.finish_reason.value if last.finish_reason is not None else "length"
        shown = ((prompt if isinstance(prompt, str) else "") + text) if full else text
        return Response(shown, last.num_prompt_tokens, len(ids), reason, ids)

    async def stream(self, prompt: str | list[int], **kwargs: Any) -> AsyncIterator[str]:
        """Yield the text as it is generated; breaking out aborts the request."""
        params, _ = sampling_params(kwargs)
        async for out in self.engine.generate(prompt, params):
            if out.new_text:
                yield out.new_text

    def close(self, drain: bool = True) -> None:
        """Stop the engine thread (after the running requests, with ``drain``)."""
        self.engine.shutdown(drain=drain)


def pipeline(
    model_or_path: nn.Module | str | os.PathLike[str],
    tokenizer: Any = None,
    config: ServeConfig | Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Pipeline:
    """A :class:`Pipeline` over a model object (with ``tokenizer`` for text) or a path / hub name / ``.gguf``.

    ``config`` and keyword arguments are :class:`~deepshard.serve.ServeConfig` keys, e.g.
    ``pipeline(path, max_ragged_batch_size=512, num_kv_blocks=1024)``.
    """
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
    else:
        model, loaded = load_model(model_or_path)
        tokenizer = tokenizer if tokenizer is not None else loaded
    return Pipeline(ServeEngine(model, tokenizer, config, **kwargs))
