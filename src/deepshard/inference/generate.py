"""Greedy generation over the fused model and its KV cache, with Hugging Face ``generate``'s semantics.

The result is what ``model.generate(input_ids, attention_mask=..., max_new_tokens=...)`` returns for
greedy decoding: the input (padding included) followed by the new tokens; a row that produced an end
token is filled with ``pad_token_id`` until every row has finished or the length limit is reached.
Prompts may be left- or right-padded: each row's valid tokens are prefilled from position 0, so
positions match HF's (which it derives from the attention mask).

Options that change greedy decoding (sampling, beams, penalties, forced tokens, ...) are refused by
name rather than ignored.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from deepshard.inference.kv_cache import KVCache
from deepshard.inference.model import FusedCausalLM

# generation-config fields that would alter the tokens of plain greedy decoding when not at HF's default
_ALTERING = (
    "do_sample", "num_beams", "num_beam_groups", "penalty_alpha", "repetition_penalty",
    "encoder_repetition_penalty", "no_repeat_ngram_size", "bad_words_ids", "min_length", "min_new_tokens",
    "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
    "guidance_scale", "exponential_decay_length_penalty", "max_time", "stop_strings", "num_return_sequences",
    "return_dict_in_generate", "output_scores", "output_logits", "output_attentions", "output_hidden_states",
    "prompt_lookup_num_tokens", "assistant_model", "watermarking_config", "logits_processor", "stopping_criteria",
)


@dataclass(frozen=True)
class GreedyPlan:
    """Resolved limits and special tokens of one ``generate`` call."""

    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None


def plan_greedy(generation_config: Any, prompt_len: int, kwargs: dict[str, Any]) -> GreedyPlan:
    """Merge ``kwargs`` into a copy of the model's ``generation_config`` and check they ask for greedy decoding.

    Raises ``ValueError`` naming an unknown keyword or an option that changes the tokens.
    """
    from transformers import GenerationConfig

    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    unused = config.update(**kwargs)
    if unused:
        raise ValueError(
            f"generate() with kernel injection got keyword arguments it does not take: {sorted(unused)}; it takes "
            "input_ids, attention_mask and generation options (max_new_tokens, max_length, eos_token_id, pad_token_id)."
        )
    default = GenerationConfig()
    for name in _ALTERING:
        value, expected = getattr(config, name, None), getattr(default, name, None)
        if value != expected and value is not None and not (not value and not expected):
            raise ValueError(
                f"generate() with kernel injection implements greedy decoding only; {name}={value!r} is not "
                f"implemented (set {name}={expected!r}, or use replace_with_kernel_inject=False for Hugging Face's "
                "generate)."
            )
    if config.max_new_tokens is not None:
        new = int(config.max_new_tokens)
    else:
        new = int(config.max_length) - prompt_len
    if new < 1:
        raise ValueError(
            f"nothing to generate: the prompt has {prompt_len} tokens and max_length={config.max_length}; pass "
            "max_new_tokens."
        )
    eos = config.eos_token_id
    eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list | tuple) else [eos]))
    pad = config.pad_token_id
    if pad is None and eos_ids:
        pad = eos_ids[0]
    return GreedyPlan(new, eos_ids, None if pad is None else int(pad))


def compact_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's valid tokens moved to the left: ``(tokens [B, L], valid [B])`` with ``L`` the longest prompt."""
    if attention_mask is None:
        b, t = input_ids.shape
        return input_ids, torch.full((b,), t, dtype=torch.long)
    mask = attention_mask.to(torch.bool)
    valid = mask.sum(1).to("cpu")
    if bool((valid == 0).any()):
        raise ValueError("attention_mask has a row with no tokens; every prompt needs at least one token.")
    if bool(mask.all()):
        return input_ids, valid
    width = int(valid.max())
    # stable sort moves the valid tokens of each row to the front, keeping their order
    order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :width]
    tokens = torch.gather(input_ids, 1, order)
    keep = torch.arange(width, device=input_ids.device)[None, :] < valid.to(input_ids.device)[:, None]
    return torch.where(keep, tokens, torch.zeros_like(tokens)), valid


def prefill(model: FusedCausalLM, cache: KVCache, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Run the prompts into slots ``0..B-1`` of ``cache``; logits ``[B, 1, vocab]`` at each row's last token."""
    batch = cache.step(torch.arange(tokens.shape[0]), tokens.shape[1], valid)
    logits = model(tokens, cache, batch)
    cache.advance(batch)
    return logits


@torch.inference_mode()
def greedy_generate(
    model: FusedCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    plan: GreedyPlan,
    *,
    max_out_tokens: int,
    min_out_tokens: int = 1,
) -> torch.Tensor:
    """Greedy decoding of ``plan.max_new_tokens`` tokens; returns ``[B, T + n]`` as Hugging Face does."""
    tokens, valid = compact_prompts(input_ids, attention_mask)
    longest = int(valid.max())
    room = max_out_tokens - longest
    if room < max(min_out_tokens, plan.max_new_tokens):
        raise ValueError(
            f"the prompt has {longest} tokens and {plan.max_new_tokens} new tokens were asked for, but "
            f"max_out_tokens={max_out_tokens} leaves room for {room} (min_out_tokens={min_out_tokens}); raise "
            "max_out_tokens in the init_inference config or ask for fewer tokens."
        )
    steps = plan.max_new_tokens
    cache = model.new_cache(tokens.shape[0], longest + steps)
    logits = prefill(model, cache, tokens, valid)
    slots = torch.arange(tokens.shape[0])
    eos = torch.tensor(plan.eos_token_ids, dtype=torch.long, device=input_ids.device)
    unfinished = torch.ones(tokens.shape[0], dtype=torch.bool, device=input_ids.device)
    out = []
    for step in range(steps):
        nxt = logits[:, -1].to(torch.float32).argmax(-1)
        if eos.numel():
            if plan.pad_token_id is not None:
                nxt = torch.where(unfinished, nxt, torch.full_like(nxt, plan.pad_token_id))
            unfinished &= ~torch.isin(nxt, eos)
        out.append(nxt)
        if step + 1 == steps or (eos.numel() and not bool(unfinished.any())):
            break
        batch = cache.step(slots, 1)
        logits = model(nxt[:, None], cache, batch)
        cache.advance(batch)
    return torch.cat([input_ids, torch.stack(out, dim=1)], dim=1)
