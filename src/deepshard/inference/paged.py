"""A paged (blocked) KV cache and the ragged batch that runs many sequences' tokens in one forward.

The cache is a pool of fixed-size *blocks* shared by all sequences: per layer, keys and values of shape
``[num_blocks * block_size, num_kv_heads, head_dim]`` (block ``b`` owns rows ``b*block_size`` to
``(b+1)*block_size``). A sequence owns a *block table*, the list of its blocks in position order, so
its memory grows one block at a time instead of being reserved for ``max_tokens`` up front, and two
sequences with a common prefix can point at the same blocks. Which block goes to whom is decided by a
scheduler (:mod:`deepshard.serve`); this module only moves keys/values and attends.

A :class:`RaggedBatch` is one forward over any mix of sequences, each contributing its own number of new
tokens (one for a decode, a chunk for a prefill): the tokens are flattened into one row ``[1, N]`` so
that every matmul (QKV, MLP, LM head) runs once over all ``N`` tokens. Attention is then done per
group: all single-token rows in one batched ``scaled_dot_product_attention`` over their padded,
gathered prefixes, and each multi-token chunk on its own (a chunk's queries are causal among
themselves and see the whole cached prefix). Trade-off: reading a prefix gathers its rows out of the
pool (a copy of ``2 * L * kv_heads * head_dim`` elements per layer per sequence per step) - the price
of paging without a custom kernel; writes are one scatter of the ``N`` new rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from deepshard.inference.ops import attention


class PagedKVCache:
    """Keys and values for ``num_blocks`` blocks of ``block_size`` positions, for every layer."""

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"a paged KV cache needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size

    def nbytes(self) -> int:
        """Bytes reserved by keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


@dataclass(frozen=True)
class RaggedEntry:
    """One sequence's part of a ragged forward: ``num_new`` tokens at positions ``start ..``, in ``block_table``."""

    block_table: Sequence[int]
    start: int
    num_new: int


@dataclass
class _Group:
    """Tokens ``token_index`` (into the flat row) attending over cache rows ``key_rows`` with ``allowed``."""

    token_index: torch.Tensor  # [Tq] flat indices of the queries, or [S] for the decode group
    key_rows: torch.Tensor  # [L] (one chunk) or [S, L] (decode group, right-padded)
    query_pos: torch.Tensor  # [Tq] (chunk) or [S] (decode group)
    decode: bool


@dataclass
class RaggedBatch:
    """A forward over ``entries`` (flattened into ``N = sum(num_new)`` tokens); build with :meth:`build`."""

    entries: list[RaggedEntry]
    block_size: int
    flat_positions: torch.Tensor  # [N]
    slot_mapping: torch.Tensor  # [N] cache row of each new token
    last_index: torch.Tensor  # [S] flat index of each entry's last token
    groups: list[_Group]
    _masks: dict[tuple[int, int | None], torch.Tensor] = field(default_factory=dict, repr=False)
    _device: torch.device = field(default=torch.device("cpu"), repr=False)

    @classmethod
    def build(cls, entries: list[RaggedEntry], block_size: int) -> RaggedBatch:
        """Index tensors for ``entries``; raises ``ValueError`` when a block table is too short for its tokens."""
        if not entries:
            raise ValueError("a ragged batch needs at least one sequence")
        positions, slots, last, groups = [], [], [], []
        dec_tokens, dec_rows, dec_pos, dec_len = [], [], [], []
        offset = 0
        for entry in entries:
            end = entry.start + entry.num_new
            if entry.num_new < 1 or len(entry.block_table) * block_size < end:
                raise ValueError(
                    f"sequence entry {entry.num_new} tokens from position {entry.start} needs "
                    f"{-(-end // block_size)} blocks of {block_size}, its block table has {len(entry.block_table)}"
                )
            table = torch.as_tensor(list(entry.block_table), dtype=torch.long)
            pos = torch.arange(entry.start, end)
            rows = table.repeat_interleave(block_size) * block_size + torch.arange(block_size).repeat(
                len(table)
            )
            positions.append(pos)
            slots.append(rows[pos])
            last.append(offset + entry.num_new - 1)
            index = torch.arange(offset, offset + entry.num_new)
            if entry.num_new == 1:
                dec_tokens.append(offset)
                dec_rows.append(rows[:end])
                dec_pos.append(entry.start)
                dec_len.append(end)
            else:
                groups.append(_Group(index, rows[:end], pos, decode=False))
            offset += entry.num_new
        if dec_tokens:
            width = max(dec_len)
            padded = torch.zeros(len(dec_rows), width, dtype=torch.long)
            for i, r in enumerate(dec_rows):
                padded[i, : r.numel()] = r
            groups.insert(0, _Group(torch.tensor(dec_tokens), padded, torch.tensor(dec_pos), decode=True))
        return cls(entries, block_size, torch.cat(positions), torch.cat(slots), torch.tensor(last), groups)

    @property
    def num_tokens(self) -> int:
        """``N``, the tokens of the forward."""
        return int(self.flat_positions.numel())

    def to(self, device: torch.device) -> RaggedBatch:
        """Place the index tensors on ``device``."""
        if device != self._device:
            self._device = device
            self.flat_positions = self.flat_positions.to(device)
            self.slot_mapping = self.slot_mapping.to(device)
            self.last_index = self.last_index.to(device)
            for g in self.groups:
                g.token_index, g.key_rows = g.token_index.to(device), g.key_rows.to(device)
                g.query_pos = g.query_pos.to(device)
            self._masks.clear()
        return self

    def positions(self) -> torch.Tensor:
        """``[1, N]`` position of every new token."""
        return self.flat_positions[None]

    def last_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` ``[1, N, C]`` at each entry's last token: ``[S, 1, C]``."""
        return h[0, self.last_index][:, None]

    def _mask(self, gi: int, window: int | None) -> torch.Tensor:
        """Boolean ``[rows, 1, Tq, L]`` mask of group ``gi`` (True: attend): causal, in-length, in-window."""
        key = (gi, window)
        if key not in self._masks:
            g = self.groups[gi]
            width = g.key_rows.shape[-1]
            k = torch.arange(width, device=self._device)
            # decode group [S, 1, 1, L] (right padding lies past each row's position), chunk [1, 1, Tq, L]
            q = g.query_pos[:, None, None, None] if g.decode else g.query_pos[None, None, :, None]
            allowed = k[None, None, None, :] <= q
            if window is not None:
                allowed = allowed & (q - k < window)
            self._masks[key] = allowed
        return self._masks[key]

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        """Store ``k, v`` ``[1, KV, N, D]`` in the pool and attend ``q`` ``[1, H, N, D]``; returns ``[1, H, N, D]``."""
        cache_k, cache_v = cache
        cache_k[self.slot_mapping] = k[0].transpose(0, 1)  # [N, KV, D]
        cache_v[self.slot_mapping] = v[0].transpose(0, 1)
        queries = q[0]  # [H, N, D]
        out = torch.empty_like(queries)
        for gi, g in enumerate(self.groups):
            mask = self._mask(gi, window)
            if g.decode:  # rows: [S, H, 1, D] over [S, KV, L, D]
                qd = queries[:, g.token_index].transpose(0, 1)[:, :, None]
                kd = cache_k[g.key_rows].transpose(1, 2)
                vd = cache_v[g.key_rows].transpose(1, 2)
                out[:, g.token_index] = attention(qd, kd, vd, mask, scale)[:, :, 0].transpose(0, 1)
            else:  # one chunk: [1, H, Tq, D] over [1, KV, L, D]
                a, b = int(g.token_index[0]), int(g.token_index[-1]) + 1
                kc = cache_k[g.key_rows].transpose(0, 1)[None]
                vc = cache_v[g.key_rows].transpose(0, 1)[None]
                out[:, a:b] = attention(queries[None, :, a:b], kc, vc, mask, scale)[0]
        return out[None]
