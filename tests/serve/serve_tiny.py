"""A tiny random-weight Llama (built from a config, no download) and a character tokenizer for the serve tests."""

from __future__ import annotations

from typing import Any

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 96


def tiny_llama(seed: int = 0, eos_token_id: int | None = None) -> Any:
    """2 layers, hidden 64, 4 heads over 2 KV heads (grouped-query attention), vocabulary of 96."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=eos_token_id,
        bos_token_id=None,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = eos_token_id
    return model


class CharTokenizer:
    """Token ``i`` is the printable character ``chr(32 + i)``; text encodes character by character."""

    eos_token_id = None
    chat_template = None

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [min(max(ord(c) - 32, 0), VOCAB - 1) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + int(i)) for i in ids)


def random_prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of token ids in [1, VOCAB) with lengths in [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(lo, hi + 1, (n,), generator=g).tolist()
    return [torch.randint(1, VOCAB, (k,), generator=g).tolist() for k in lengths]


def reference_greedy(model: Any, prompt: list[int], max_tokens: int) -> list[int]:
    """Hugging Face ``generate`` on the prompt alone (batch 1, greedy; an explicit all-ones attention mask, else
    HF would mask the tokens equal to ``pad_token_id``)."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


class ChatCharTokenizer(CharTokenizer):
    """:class:`CharTokenizer` with a minimal chat template (``role: content`` lines, then ``assistant:``)."""

    chat_template = "role: content"

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool, tokenize: bool
    ) -> str:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return text + ("assistant:" if add_generation_prompt else "")
