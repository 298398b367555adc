"""Automatic tensor parallelism of Hugging Face decoder models (DeepSpeed's AutoTP), no policy needed.

Every decoder layer's attention is split by heads and its MLP by intermediate columns, Megatron style:
the query/key/value projections and the MLP's input projections keep this rank's output rows
("column parallel"), the attention output and the MLP's output projection keep the matching input
columns and sum their partial products over the tensor-parallel group ("row parallel", one all-reduce
each). Embeddings, norms and the LM head stay whole on every rank.

Heads are split by key/value head, so grouped-query attention keeps each query head with its key/value
head, and counts that do not divide evenly are allowed: rank ``r`` of ``P`` gets
``H_kv // P + (r < H_kv % P)`` key/value heads (DeepSpeed's ``get_shard_size`` rule) and the query heads
that attend to them. The MLP's intermediate size is split in multiples of ``tp_grain_size`` the same
way. Modules are found by structure: an attention module with ``q_proj``/``k_proj``/``v_proj``/``o_proj``
linears and a ``head_dim`` (Llama, Mistral, Qwen2 and relatives) and an MLP with
``gate_proj``/``up_proj``/``down_proj``; a model with neither is refused with a message. Not built:
splitting the embeddings and LM head, GPT-2/OPT/BERT layouts, loading each rank's slice straight from
safetensors shards (the whole model is loaded, then cut).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deepshard import comm


def shard_size(total: int, parts: int, rank: int, grain: int = 1) -> int:
    """Rank ``rank``'s share of ``total`` units split over ``parts`` in multiples of ``grain`` (the last may be short).

    ``total`` is cut into ``ceil(total / grain)`` grains; the first ``grains % parts`` ranks get one more.
    """
    grains = -(-total // grain)
    if grains < parts:
        raise ValueError(
            f"cannot split {total} units in grains of {grain} over {parts} tensor-parallel ranks: every rank needs "
            f"at least one grain; lower tensor_parallel.tp_size (or tp_grain_size)."
        )
    mine = grains // parts + (1 if rank < grains % parts else 0)
    before = rank * (grains // parts) + min(rank, grains % parts)
    return max(0, min(mine * grain, total - before * grain))


def shard_offset(total: int, parts: int, rank: int, grain: int = 1) -> int:
    """Where rank ``rank``'s share of :func:`shard_size` starts."""
    return sum(shard_size(total, parts, r, grain) for r in range(rank))


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_r @ W_r^T) + b``: this rank's input columns of a linear layer, summed over the group."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: Any) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.nn.functional.linear(x, self.weight)
        comm.all_reduce(out, group=self.group)
        return out if self.bias is None else out + self.bias


@dataclass(frozen=True)
class TPPlan:
    """What this rank keeps: key/value heads and MLP columns, with where they start."""

    tp_size: int
    rank: int
    grain: int


def _rows(linear: nn.Linear, start: int, count: int) -> None:
    """Keep output rows ``[start, start + count)`` of ``linear`` (column parallel)."""
    linear.weight = nn.Parameter(linear.weight.data[start : start + count].clone(), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[start : start + count].clone(), requires_grad=False)
    linear.out_features = count


def _row_parallel(linear: nn.Linear, start: int, count: int, group: Any) -> RowParallelLinear:
    weight = linear.weight.data[:, start : start + count].clone()
    bias = None if linear.bias is None else linear.bias.data.clone()
    return RowParallelLinear(weight, bias, group)


def _split_attention(attn: Any, plan: TPPlan, group: Any) -> None:
    head_dim = int(attn.head_dim)
    q_heads = attn.q_proj.out_features // head_dim
    kv_heads = attn.k_proj.out_features // head_dim
    if q_heads % kv_heads:
        raise ValueError(
            f"{type(attn).__name__}: {q_heads} query heads are not a multiple of {kv_heads} key/value heads"
        )
    groups = q_heads // kv_heads
    kv_count = shard_size(kv_heads, plan.tp_size, plan.rank)
    kv_start = shard_offset(kv_heads, plan.tp_size, plan.rank)
    _rows(attn.q_proj, kv_start * groups * head_dim, kv_count * groups * head_dim)
    _rows(attn.k_proj, kv_start * head_dim, kv_count * head_dim)
    _rows(attn.v_proj, kv_start * head_dim, kv_count * head_dim)
    attn.o_proj = _row_parallel(
        attn.o_proj, kv_start * groups * head_dim, kv_count * groups * head_dim, group
    )
    for name, value in (("num_heads", kv_count * groups), ("num_key_value_heads", kv_count)):
        if hasattr(attn, name):
            setattr(attn, name, value)


def _split_mlp(mlp: Any, plan: TPPlan, group: Any) -> None:
    total = mlp.down_proj.in_features
    count = shard_size(total, plan.tp_size, plan.rank, plan.grain)
    start = shard_offset(total, plan.tp_size, plan.rank, plan.grain)
    _rows(mlp.gate_proj, start, count)
    _rows(mlp.up_proj, start, count)
    mlp.down_proj = _row_parallel(mlp.down_proj, start, count, group)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = count


def _is_attention(module: nn.Module) -> bool:
    return all(
        isinstance(getattr(module, n, None), nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
    ) and hasattr(module, "head_dim")


def _is_mlp(module: nn.Module) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))


def tp_group(tp_size: int) -> Any:
    """Collective: this rank's tensor-parallel group (consecutive ranks; the world when ``tp_size`` equals it)."""
    world, rank = comm.get_world_size(), comm.get_rank()
    if world % tp_size:
        raise ValueError(
            f"tensor_parallel.tp_size={tp_size} does not divide the {world} ranks of this job; start a multiple of "
            f"{tp_size} ranks or change tp_size."
        )
    if tp_size == world:
        return None
    mine = None
    for first in range(0, world, tp_size):
        group = comm.new_group(list(range(first, first + tp_size)))
        if first <= rank < first + tp_size:
            mine = group
    return mine


@torch.no_grad()
def auto_tp(model: nn.Module, tp_size: int, grain: int = 64) -> list[str]:
    """Split ``model``'s attention and MLP layers in place over ``tp_size`` ranks; return the names split.

    Collective when ``tp_size > 1`` (creates the tensor-parallel groups). Every rank must hold the same
    whole model before the call (same seed or the same checkpoint).
    """
    if not comm.is_initialized() or comm.get_world_size() < tp_size:
        raise ValueError(
            f"tensor_parallel.tp_size={tp_size} needs a process group of at least {tp_size} ranks; start the job "
            "with the deepshard launcher (e.g. `deepshard --num_gpus 2 infer.py`)."
        )
    group = tp_group(tp_size)
    rank = comm.get_rank(group)
    plan = TPPlan(tp_size, rank, grain)
    split: list[str] = []
    for name, module in model.named_modules():
        if _is_attention(module):
            _split_attention(module, plan, group)
            split.append(name)
        elif _is_mlp(module):
            _split_mlp(module, plan, group)
            split.append(name)
    if not split:
        raise ValueError(
            f"automatic tensor parallelism found no attention (q_proj/k_proj/v_proj/o_proj) or MLP "
            f"(gate_proj/up_proj/down_proj) modules in {type(model).__name__}; it supports Llama-family models "
            "(Llama, Mistral, Qwen2, ...). Run this model with tensor_parallel.tp_size=1."
        )
    return split


__all__ = ["RowParallelLinear", "auto_tp", "shard_offset", "shard_size", "tp_group"]
