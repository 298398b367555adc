"""Sampling parameters of one request and the sampler that turns last-token logits into next tokens.

Greedy (``temperature == 0``) is an argmax in fp32 over all greedy rows at once. Sampled rows are
scaled by ``1 / temperature``, filtered to the ``top_k`` largest logits and to the smallest set whose
probability reaches ``top_p`` (the most likely token is always kept), then drawn with the request's own
``torch.Generator``: with a ``seed`` a request's tokens do not depend on which other requests share its
batch. Stop strings are matched on the decoded text by the engine (:mod:`deepshard.serve.engine`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """What to generate for one request (OpenAI's names; ``max_tokens`` counts new tokens).

    ``temperature=0`` is greedy decoding. ``top_k=0`` and ``top_p=1`` disable those filters. ``stop`` are
    strings that end the output (not included in it); ``stop_token_ids`` end it on those tokens (the
    model's end-of-sequence tokens are added by the engine unless ``ignore_eos``).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not (self.temperature >= 0.0) or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {list(self.stop)!r}")

    @property
    def greedy(self) -> bool:
        """Whether this is greedy decoding."""
        return self.temperature == 0.0

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The request's random generator (seeded when ``seed`` is set); ``None`` for greedy decoding."""
        if self.greedy:
            return None
        gen = torch.Generator(device=device)
        if self.seed is not None:
            gen.manual_seed(self.seed)
        else:
            gen.seed()
        return gen


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """``logits`` ``[V]`` (fp32, already temperature-scaled) with tokens outside top-k / top-p set to ``-inf``."""
    if top_k and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (so the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Next token of each row of ``logits`` ``[S, V]`` under ``params[s]`` and ``generators[s]``."""
    logits = logits.to(torch.float32)
    tokens = logits.argmax(-1).tolist()
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.greedy:
            continue
        scaled = filter_logits(logits[row] / p.temperature, p.top_k, p.top_p)
        tokens[row] = int(torch.multinomial(scaled.softmax(-1), 1, generator=gen))
    return tokens
