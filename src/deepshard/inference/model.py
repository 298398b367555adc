"""The injected causal language model: embeddings, fused layers, final norm and LM head over a :class:`KVCache`.

Its forward is the unit a scheduler drives: ``forward(input_ids, cache, batch)`` runs one step for the
slots in ``batch`` (prefill of ``T`` tokens, or decode of one) and returns logits, by default only at
each row's last valid token (what generation needs; the LM head is the largest matmul of a small model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepshard.inference.kv_cache import KVCache, StepBatch
from deepshard.inference.layers import FusedLayer
from deepshard.inference.ops import Rotary, add_norm
from deepshard.inference.paged import PagedKVCache, RaggedBatch


@dataclass(frozen=True)
class CacheShape:
    """What one slot of the KV cache holds per layer."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


class FusedCausalLM(nn.Module):
    """A decoder-only LM made of :class:`FusedLayer` blocks.

    ``positions`` is a learned position table (GPT-2, OPT) read at ``position + position_offset``;
    ``rotary`` gives rotary tables instead (Llama family). ``project_in``/``project_out`` map between
    the embedding and hidden widths (OPT-350m).
    """

    def __init__(
        self,
        embed: nn.Embedding,
        layers: list[FusedLayer],
        final_norm: nn.Module | None,
        lm_head: nn.Module,
        cache_shape: CacheShape,
        *,
        rotary: Rotary | None = None,
        positions: nn.Embedding | None = None,
        position_offset: int = 0,
        project_in: nn.Module | None = None,
        project_out: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.embed = embed
        self.layers = nn.ModuleList(layers)
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.rotary = rotary
        self.positions = positions
        self.position_offset = position_offset
        self.project_in = project_in
        self.project_out = project_out
        self.cache_shape = cache_shape

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (that of the embedding table)."""
        return self.embed.weight.dtype

    def new_cache(self, num_slots: int, max_tokens: int) -> KVCache:
        """A zeroed KV cache of ``num_slots`` sequences of up to ``max_tokens`` tokens, on the model's device."""
        s = self.cache_shape
        return KVCache(
            s.num_layers, num_slots, s.num_kv_heads, s.head_dim, max_tokens,
            dtype=self.dtype, device=self.embed.weight.device,
        )

    def new_paged_cache(self, num_blocks: int, block_size: int) -> PagedKVCache:
        """A zeroed paged KV cache of ``num_blocks`` blocks of ``block_size`` positions, on the model's device."""
        s = self.cache_shape
        return PagedKVCache(
            s.num_layers, num_blocks, block_size, s.num_kv_heads, s.head_dim,
            dtype=self.dtype, device=self.embed.weight.device,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | PagedKVCache,
        batch: StepBatch | RaggedBatch,
        *,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Run ``input_ids`` ``[B, T]`` for the slots of ``batch``; the caller then calls ``cache.advance(batch)``.

        Returns logits ``[B, T, vocab]`` with ``all_logits``, else ``[B, 1, vocab]`` at each row's last
        valid token. With a paged cache and a :class:`RaggedBatch`, ``input_ids`` is ``[1, N]`` (every
        sequence's new tokens, flattened) and the last-token logits are ``[S, 1, vocab]``, one per sequence
        (the block tables are the caller's; there is nothing to advance).
        """
        device = input_ids.device
        batch.to(device)
        positions = batch.positions()
        h = self.embed(input_ids)
        if self.project_in is not None:
            h = self.project_in(h)
        if self.positions is not None:
            h = h + F.embedding(positions + self.position_offset, self.positions.weight)
        rope = self.rotary.tables(positions, h.dtype) if self.rotary is not None else None
        residual: torch.Tensor | None = None
        for i, layer in enumerate(self.layers):
            h, residual = layer(h, residual, rope, (cache.keys[i], cache.values[i]), batch)
        if self.final_norm is not None:
            h = self.final_norm(h) if residual is None else add_norm(h, residual, self.final_norm)[0]
        elif residual is not None:
            h = residual + h
        if not all_logits:
            h = batch.last_hidden(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return self.lm_head(h)
