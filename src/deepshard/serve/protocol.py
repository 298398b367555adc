"""OpenAI's HTTP request bodies (the fields deepshard serves) and their translation to :class:`SamplingParams`.

Fields OpenAI defines that change the output and that deepshard does not implement (``n > 1``,
``logprobs``, ``echo``, penalties, ``logit_bias``, ``best_of``, tools) are refused with a 400 naming
the field rather than ignored. Unknown fields are ignored, as OpenAI's server does.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from deepshard.serve.sampling import SamplingParams


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # vLLM's extension
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    ignore_eos: bool = False  # vLLM's extension

    _REFUSED: tuple[tuple[str, Any], ...] = (
        ("logprobs", None),
        ("echo", False),
        ("presence_penalty", 0),
        ("frequency_penalty", 0),
        ("logit_bias", None),
        ("best_of", None),
        ("top_logprobs", None),
        ("tools", None),
        ("suffix", None),
        ("response_format", None),
        ("min_tokens", 0),
    )

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """The :class:`SamplingParams` this request asks for; ``ValueError`` names a field deepshard refuses."""
        if self.n != 1:
            raise ValueError(f"n={self.n}: only n=1 is implemented; send n separate requests")
        extra = self.model_extra or {}
        for name, default in self._REFUSED:
            value = extra.get(name, default)
            if value not in (default, None, False, 0):
                raise ValueError(f"{name}={value!r} is not implemented by deepshard's server; leave it out")
        stop = () if self.stop is None else (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return SamplingParams(
            max_tokens=default_max_tokens if self.max_tokens is None else self.max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(_Request):
    """``POST /v1/completions``: ``prompt`` is a string or a list of token ids (OpenAI's default max_tokens: 16)."""

    prompt: str | list[int]


class ChatMessage(BaseModel):
    """One message of a chat."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str


class ChatCompletionRequest(_Request):
    """``POST /v1/chat/completions``: ``messages`` are rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
