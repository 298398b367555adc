"""Kernel injection: convert a Hugging Face model into :class:`FusedCausalLM` (one function per family).

Each policy reads the model's config and modules and builds the fused layers: Q/K/V stacked into one
projection, gate/up stacked into one, the other weights shared with the source model (no copy). The
HF model is left as it was. Options a policy cannot express are refused with the option's name, never
approximated.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from deepshard.inference.layers import FusedAttention, FusedLayer, FusedMLP, LayerShape, fuse_linears, linear
from deepshard.inference.model import CacheShape, FusedCausalLM
from deepshard.inference.ops import RMSNorm, Rotary


def _refuse(model: nn.Module, option: str, value: object) -> ValueError:
    return ValueError(
        f"replace_with_kernel_inject: {type(model).__name__} with config.{option}={value!r} is not supported by "
        "deepshard's fused layers; run without kernel injection (replace_with_kernel_inject=False)."
    )


def _wb(module: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    return module.weight, getattr(module, "bias", None)


def _conv1d(module: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GPT-2's ``Conv1D`` stores ``[in, out]``; the fused layers use ``nn.Linear``'s ``[out, in]``."""
    return module.weight.t().contiguous(), module.bias


def _rms(module: Any) -> RMSNorm:
    eps = getattr(module, "variance_epsilon", None)
    return RMSNorm(module.weight, float(module.eps if eps is None else eps))


def _llama(model: Any) -> FusedCausalLM:
    """Llama, Mistral, Qwen2: RMSNorm, rotary, grouped-query attention, gated SiLU MLP."""
    cfg, base = model.config, model.model
    rotary_emb = base.rotary_emb
    rope_type = getattr(rotary_emb, "rope_type", "default")
    if "dynamic" in rope_type or rope_type == "longrope":
        raise _refuse(model, "rope_parameters.rope_type", rope_type)
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = []
    for layer in base.layers:
        attn, mlp = layer.self_attn, layer.mlp
        window = getattr(attn, "sliding_window", None)  # Qwen2: per layer (None on full-attention layers)
        if cfg.model_type == "mistral":
            window = cfg.sliding_window
        shape = LayerShape(heads, kv_heads, head_dim, attn.scaling, window)
        fused_attn = FusedAttention(
            shape, fuse_linears([_wb(attn.q_proj), _wb(attn.k_proj), _wb(attn.v_proj)]), linear(*_wb(attn.o_proj))
        )
        fused_mlp = FusedMLP(
            fuse_linears([_wb(mlp.gate_proj), _wb(mlp.up_proj)]), mlp.act_fn, linear(*_wb(mlp.down_proj)), gated=True
        )
        layers.append(FusedLayer(_rms(layer.input_layernorm), fused_attn, _rms(layer.post_attention_layernorm),
                                 fused_mlp, pre_norm=True))
    return FusedCausalLM(
        base.embed_tokens, layers, _rms(base.norm), model.lm_head, CacheShape(len(layers), kv_heads, head_dim),
        rotary=Rotary(rotary_emb.inv_freq, float(rotary_emb.attention_scaling)),
    )


def _gpt2(model: Any) -> FusedCausalLM:
    """GPT-2: LayerNorm, learned positions, fused ``c_attn`` already, GELU MLP (``Conv1D`` weights transposed)."""
    cfg, base = model.config, model.transformer
    for option in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn", "add_cross_attention"):
        if getattr(cfg, option, False):
            raise _refuse(model, option, True)
    heads = cfg.n_head
    head_dim = cfg.n_embd // heads
    scale = head_dim**-0.5 if cfg.scale_attn_weights else 1.0
    layers = []
    for block in base.h:
        shape = LayerShape(heads, heads, head_dim, scale)
        attn = FusedAttention(shape, linear(*_conv1d(block.attn.c_attn)), linear(*_conv1d(block.attn.c_proj)))
        mlp = FusedMLP(linear(*_conv1d(block.mlp.c_fc)), block.mlp.act, linear(*_conv1d(block.mlp.c_proj)), gated=False)
        layers.append(FusedLayer(block.ln_1, attn, block.ln_2, mlp, pre_norm=True))
    return FusedCausalLM(
        base.wte, layers, base.ln_f, model.lm_head, CacheShape(len(layers), heads, head_dim), positions=base.wpe
    )


def _opt(model: Any) -> FusedCausalLM:
    """OPT: LayerNorm (pre- or post-norm), learned positions at offset 2, ReLU MLP, optional in/out projections."""
    cfg, dec = model.config, model.model.decoder
    heads = cfg.num_attention_heads
    head_dim = cfg.hidden_size // heads
    layers = []
    for layer in dec.layers:
        a = layer.self_attn
        shape = LayerShape(heads, heads, head_dim, a.scaling)
        attn = FusedAttention(shape, fuse_linears([_wb(a.q_proj), _wb(a.k_proj), _wb(a.v_proj)]), linear(*_wb(a.out_proj)))
        mlp = FusedMLP(linear(*_wb(layer.fc1)), layer.activation_fn, linear(*_wb(layer.fc2)), gated=False)
        layers.append(FusedLayer(layer.self_attn_layer_norm, attn, layer.final_layer_norm, mlp,
                                 pre_norm=cfg.do_layer_norm_before))
    return FusedCausalLM(
        dec.embed_tokens, layers, dec.final_layer_norm, model.lm_head, CacheShape(len(layers), heads, head_dim),
        positions=dec.embed_positions, position_offset=dec.embed_positions.offset,
        project_in=dec.project_in, project_out=dec.project_out,
    )


POLICIES: dict[str, Callable[[Any], FusedCausalLM]] = {
    "LlamaForCausalLM": _llama,
    "MistralForCausalLM": _llama,
    "Qwen2ForCausalLM": _llama,
    "GPT2LMHeadModel": _gpt2,
    "OPTForCausalLM": _opt,
}
"""Hugging Face causal-LM classes (by name) that kernel injection converts."""


def inject(model: nn.Module) -> FusedCausalLM:
    """The fused equivalent of ``model``; raises ``ValueError`` naming the class when no policy covers it."""
    policy = POLICIES.get(type(model).__name__)
    if policy is None:
        raise ValueError(
            f"replace_with_kernel_inject=True: no fused implementation for {type(model).__name__}; supported: "
            f"{', '.join(sorted(POLICIES))}. Use replace_with_kernel_inject=False to run the model as it is."
        )
    with torch.no_grad():
        return policy(model)
