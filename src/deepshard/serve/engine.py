"""The serving engine: requests in, one ragged forward per :meth:`ServeEngine.step`, tokens out.

It owns the kernel-injected model (:func:`deepshard.init_inference` with ``replace_with_kernel_inject``),
a paged KV cache and the :class:`~deepshard.serve.scheduler.Scheduler`. A step asks the scheduler for a
pass, flattens the chunks into one ``[1, N]`` row, runs :class:`~deepshard.inference.FusedCausalLM`
over a :class:`~deepshard.inference.paged.RaggedBatch`, samples the sequences whose pending tokens
ended in this pass, and finishes those that hit a stop token, a stop string or ``max_tokens``.
The engine is synchronous and single-threaded; :mod:`deepshard.serve.async_engine` drives it from a
background thread for concurrent callers.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepshard.inference import init_inference
from deepshard.inference.paged import RaggedBatch, RaggedEntry
from deepshard.serve.config import ServeConfig, load_serve_config
from deepshard.serve.sampling import SamplingParams, sample
from deepshard.serve.scheduler import Scheduler
from deepshard.serve.sequence import FinishReason, SeqState, Sequence

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: new tokens (and text, with a tokenizer) since the last output."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: FinishReason | None
    num_prompt_tokens: int
    num_output_tokens: int


class ServeEngine:
    """Continuous batching over a paged KV cache for one model; see the module docstring.

    ``model`` is a Hugging Face causal LM of a family kernel injection covers (Llama, Mistral, Qwen2,
    GPT-2, OPT). ``tokenizer`` (optional) enables text prompts, stop strings and text output.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        config: ServeConfig | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.config = load_serve_config(config, **kwargs)
        engine = init_inference(model, dtype=self.config.dtype, replace_with_kernel_inject=True)
        assert engine.fused is not None
        self.model = engine.fused
        self.hf_model = engine.module
        self.tokenizer = tokenizer
        self.device = self.model.embed.weight.device
        self.cache = self.model.new_paged_cache(self.config.num_kv_blocks, self.config.block_size)
        self.scheduler = Scheduler(self.config)
        self._requests: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self.passes = 0
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(getattr(model, "config", None), "eos_token_id", None)
        self.eos_token_ids: tuple[int, ...] = (
            () if eos is None else tuple(eos if isinstance(eos, list) else [eos])
        )
        positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_context = min(self.config.max_context, positions) if positions else self.config.max_context
        logger.info(
            "serve engine: %d KV blocks of %d (%.1f MiB), token budget %d, up to %d sequences per pass",
            self.config.num_kv_blocks,
            self.config.block_size,
            self.cache.nbytes() / 2**20,
            self.config.max_ragged_batch_size,
            self.config.max_ragged_sequence_count,
        )

    # ------------------------------------------------------------------ requests
    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids of ``prompt`` (a string needs the tokenizer)."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass tokenizer= or give token ids")
            return list(self.tokenizer(prompt)["input_ids"])
        return [int(t) for t in prompt]

    def add_request(
        self, prompt: str | list[int], params: SamplingParams | None = None, request_id: str | None = None
    ) -> str:
        """Queue a request; returns its id. Raises ``ValueError`` for an empty or over-long prompt or a full queue."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(ids) + params.max_tokens > self.max_context:
            raise ValueError(
                f"the prompt has {len(ids)} tokens and max_tokens={params.max_tokens}: {len(ids) + params.max_tokens} "
                f"exceeds the context of {self.max_context} tokens; shorten the prompt or lower max_tokens."
            )
        if self.scheduler.num_unfinished >= self.config.max_tracked_sequences:
            raise QueueFullError(
                f"{self.scheduler.num_unfinished} requests are in flight (max_tracked_sequences="
                f"{self.config.max_tracked_sequences}); retry later"
            )
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self._requests:
            raise ValueError(f"request id {rid!r} is already in use")
        seq = Sequence(rid, next(self._arrivals), len(ids), ids, params, params.generator(self.device))
        self.scheduler.add(seq)
        self._requests[rid] = seq
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV blocks (no-op for an unknown or finished id)."""
        seq = self._requests.pop(request_id, None)
        if seq is not None:
            self.scheduler.abort(seq)

    def has_unfinished(self) -> bool:
        """Whether any request is queued or running."""
        return self.scheduler.num_unfinished > 0

    # ------------------------------------------------------------------ one pass
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one forward pass; returns an output for every request that got tokens or finished."""
        plan = self.scheduler.schedule()
        if not plan:
            return []
        entries = [RaggedEntry(c.seq.block_table, c.seq.num_computed, c.num_new) for c in plan]
        flat = [t for c in plan for t in c.seq.tokens[c.seq.num_computed : c.seq.num_computed + c.num_new]]
        ids = torch.tensor(flat, dtype=torch.long, device=self.device)[None]
        batch = RaggedBatch.build(entries, self.config.block_size)
        rows = [i for i, c in enumerate(plan) if c.sample]
        logits = self.model(ids, self.cache, batch)[:, 0]  # [S, V]
        self.scheduler.commit(plan)
        self.passes += 1
        if not rows:
            return []
        seqs = [plan[i].seq for i in rows]
        tokens = sample(logits[rows], [s.params for s in seqs], [s.generator for s in seqs])
        self.scheduler.counters.sampled_tokens += len(rows)
        return [
            out for seq, tok in zip(seqs, tokens, strict=True) if (out := self._append(seq, tok)) is not None
        ]

    def _append(self, seq: Sequence, token: int) -> RequestOutput | None:
        seq.tokens.append(token)
        if seq.last_step >= 0:
            seq.max_gap = max(seq.max_gap, self.passes - seq.last_step)
        seq.last_step = self.passes
        p = seq.params
        n_out = len(seq.tokens) - seq.prompt_len
        reason: FinishReason | None = None
        stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
        if token in stop_ids:
            reason = FinishReason.STOP
        elif n_out >= p.max_tokens or len(seq.tokens) >= self.max_context:
            reason = FinishReason.LENGTH
        text_end = 0
        if self.tokenizer is not None:
            # the stop token itself is not part of the text
            shown = seq.output if reason is not FinishReason.STOP else seq.output[:-1]
            seq.text = self.tokenizer.decode(shown, skip_special_tokens=True)
            text_end = len(seq.text)
            for stop in p.stop:
                at = seq.text.find(stop)
                if at >= 0:
                    seq.text, reason, text_end = seq.text[:at], FinishReason.STOP, at
            if reason is None and p.stop:  # hold back what could be the start of a stop string
                text_end = max(seq.emitted_text, len(seq.text) - max(len(s) for s in p.stop) + 1)
            if reason is None and seq.text.endswith("\ufffd"):  # an incomplete multi-byte character
                text_end = min(text_end, len(seq.text) - 1)
        if reason is not None:
            self.scheduler.finish(seq, reason)
            self._requests.pop(seq.request_id, None)
        new_ids = seq.output[seq.emitted_tokens :]
        new_text = seq.text[seq.emitted_text : max(text_end, seq.emitted_text)]
        seq.emitted_tokens = n_out
        seq.emitted_text = max(text_end, seq.emitted_text)
        return RequestOutput(
            seq.request_id,
            new_ids,
            new_text,
            seq.state is SeqState.FINISHED,
            seq.finish_reason,
            seq.prompt_len,
            n_out,
        )

    # ------------------------------------------------------------------ batch API
    def generate(
        self, prompts: Iterable[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[Sequence]:
        """Run ``prompts`` to completion (continuous batching among them); the finished sequences, in order."""
        prompts = list(prompts)
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist, strict=True)]
        seqs = [self._requests[r] for r in rids]
        while any(s.state is not SeqState.FINISHED for s in seqs):
            self.step()
        return seqs


class QueueFullError(RuntimeError):
    """Raised by :meth:`ServeEngine.add_request` when ``max_tracked_sequences`` requests are in flight."""
