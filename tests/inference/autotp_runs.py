"""Rank functions of the AutoTP tests (pickled by reference, run on the harness's ranks)."""

from __future__ import annotations

import copy
from typing import Any

import torch

import deepshard


def _model(kv_heads: int, heads: int, hidden: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # every rank holds the same whole model before the split
    config = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=None)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 distance ``||a - b|| / ||b||`` in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def tp_against_whole(tp_size: int, kv_heads: int, heads: int, hidden: int) -> dict[str, Any]:
    """Logits and greedy tokens of the split model vs the whole fp32 model and a float64 copy."""
    model = _model(kv_heads, heads, hidden)
    whole, exact = copy.deepcopy(model), copy.deepcopy(model).double()
    engine = deepshard.init_inference(model, dtype=torch.float32, tensor_parallel={"tp_size": tp_size})
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(3))
    logits, ref, ref64 = engine(ids).logits, whole(ids).logits, exact(ids).logits
    tokens = engine.generate(ids[:, :5], max_new_tokens=8, do_sample=False)
    ref_tokens = whole.generate(ids[:, :5], max_new_tokens=8, do_sample=False)
    attn = engine.module.model.layers[0].self_attn
    return {
        "tp_vs_exact": _rel(logits, ref64),
        "fp32_vs_exact": _rel(ref, ref64),
        "tp_vs_fp32": _rel(logits, ref),
        "tokens_equal": torch.equal(tokens, ref_tokens),
        "q_rows": attn.q_proj.out_features,
        "k_rows": attn.k_proj.out_features,
        "mlp_cols": engine.module.model.layers[0].mlp.up_proj.out_features,
    }
