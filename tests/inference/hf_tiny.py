"""Tiny random-weight Hugging Face models built from configs (no download), one per injected architecture."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB = 128
ARCHS = ("llama", "mistral", "qwen2", "gpt2", "opt", "opt_postnorm")


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer model of ``arch`` with hidden size 64, 4 heads (2 KV heads where the family has GQA)."""
    t = transformers
    gqa = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(seed)
    if arch == "llama":
        model = t.LlamaForCausalLM(t.LlamaConfig(**gqa))
    elif arch == "mistral":  # a window shorter than the tests' sequences, so the sliding mask is exercised
        model = t.MistralForCausalLM(t.MistralConfig(**gqa, sliding_window=6))
    elif arch == "qwen2":  # q/k/v biases; layer 1 slides (max_window_layers=1), layer 0 attends fully
        model = t.Qwen2ForCausalLM(t.Qwen2Config(**gqa, use_sliding_window=True, sliding_window=6, max_window_layers=1))
    elif arch == "gpt2":
        model = t.GPT2LMHeadModel(t.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                               eos_token_id=None, bos_token_id=None))
    elif arch in ("opt", "opt_postnorm"):  # post-norm OPT (350m) also has in/out projections
        post = arch == "opt_postnorm"
        model = t.OPTForCausalLM(t.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                             num_attention_heads=4, max_position_embeddings=256, eos_token_id=None,
                                             word_embed_proj_dim=32 if post else 64, do_layer_norm_before=not post))
    else:
        raise KeyError(arch)
    return model.eval()
