"""One request's state inside the engine: its tokens, its blocks, where its computation stands."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from deepshard.serve.block_allocator import PrefixKey
from deepshard.serve.sampling import SamplingParams


class SeqState(enum.Enum):
    """``WAITING`` (queued or preempted), ``RUNNING`` (holds blocks, is scheduled), ``FINISHED``."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(enum.Enum):
    """Why a sequence ended (OpenAI's ``finish_reason`` values, plus ``abort``)."""

    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"


@dataclass
class Sequence:
    """A request as the scheduler sees it.

    ``tokens`` is the prompt followed by the generated tokens; ``num_computed`` counts the leading tokens
    whose keys/values are in the cache (in ``block_table``). ``pending = len(tokens) - num_computed``
    tokens remain to be run: a whole prompt (or a chunk of it) before the first token, exactly one in
    decode. Preemption sets ``num_computed`` back to 0 and gives the blocks back: the sequence is
    recomputed from its tokens (prompt and output) when it is admitted again.
    """

    request_id: str
    arrival: int
    prompt_len: int
    tokens: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    state: SeqState = SeqState.WAITING
    finish_reason: FinishReason | None = None
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    block_keys: list[PrefixKey] = field(default_factory=list)
    text: str = ""  # decoded output so far (when the engine has a tokenizer)
    emitted_text: int = 0  # characters of ``text`` already handed to the caller
    emitted_tokens: int = 0  # output tokens already handed to the caller
    last_step: int = -1  # engine pass that produced the latest token (decode-gap measurement)
    max_gap: int = 0  # largest number of passes between two consecutive output tokens

    @property
    def output(self) -> list[int]:
        """The generated tokens."""
        return self.tokens[self.prompt_len :]

    @property
    def pending(self) -> int:
        """Tokens still to run before the next token can be sampled."""
        return len(self.tokens) - self.num_computed
