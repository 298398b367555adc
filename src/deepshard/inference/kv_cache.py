"""The preallocated KV cache and the per-forward description of which slots and positions a batch covers.

The cache is a fixed set of *slots* (one sequence each) of ``max_tokens`` positions, allocated once:
per layer, keys and values of shape ``[num_slots, num_kv_heads, max_tokens, head_dim]``. A forward
writes the new tokens' keys/values at their positions and attends over each slot's prefix, so a step
costs no allocation and no copy of the past (Hugging Face's ``DynamicCache`` concatenates every step).

A scheduler drives it through :class:`StepBatch`: any subset of slots, each row continuing its own
sequence from its own length, with ``T`` new tokens per row (``T > 1`` for prefill; rows shorter than
``T`` are right-padded and give a ``valid`` count). Memory: ``2 * layers * slots * kv_heads *
max_tokens * head_dim`` elements, reserved up front; that is the trade for no per-step allocation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from deepshard.inference.ops import attention


class KVCache:
    """Keys and values of ``num_slots`` sequences of up to ``max_tokens`` tokens, for every layer.

    ``lengths[s]`` is how many positions of slot ``s`` hold valid keys/values (a host tensor: the
    scheduler reads it without a device sync).
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        max_tokens: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (num_slots, num_kv_heads, max_tokens, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(num_slots, dtype=torch.long)
        self.max_tokens = max_tokens

    @property
    def num_slots(self) -> int:
        """How many sequences the cache holds."""
        return int(self.lengths.numel())

    def nbytes(self) -> int:
        """Bytes reserved by keys and values."""
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def release(self, slots: torch.Tensor | list[int]) -> None:
        """Mark ``slots`` empty so that a new sequence can use them (their old contents are overwritten)."""
        self.lengths[torch.as_tensor(slots, dtype=torch.long)] = 0

    def step(self, slots: torch.Tensor, num_new: int, valid: torch.Tensor | None = None) -> StepBatch:
        """Describe one forward over ``slots`` (``[B]``) with ``num_new`` new tokens per row.

        ``valid`` (``[B]``, default all ``num_new``) counts each row's real tokens; the rest are padding
        on the right whose keys are written but never attended to by real tokens. Raises ``ValueError``
        when a row would run past ``max_tokens``.
        """
        slots = slots.to(dtype=torch.long, device="cpu")
        starts = self.lengths[slots]
        valid = torch.full_like(starts, num_new) if valid is None else valid.to(dtype=torch.long, device="cpu")
        end = int((starts + num_new).max())
        if end > self.max_tokens:
            raise ValueError(
                f"a sequence needs {end} positions but the KV cache holds max_out_tokens={self.max_tokens}; raise "
                "max_out_tokens in the init_inference config, or shorten the prompt / max_new_tokens."
            )
        return StepBatch(slots=slots, starts=starts, valid=valid, num_new=num_new, span=end)

    def advance(self, batch: StepBatch) -> None:
        """Record that ``batch``'s valid tokens are now in the cache."""
        self.lengths[batch.slots] = batch.starts + batch.valid


@dataclass
class StepBatch:
    """Which slots a forward covers and where its tokens go; built by :meth:`KVCache.step`.

    Rows of the batch are slots ``slots[b]``; row ``b``'s token ``i`` sits at position ``starts[b] + i``.
    ``span`` is the number of cache positions attended to (``max(starts) + num_new``).
    """

    slots: torch.Tensor
    starts: torch.Tensor
    valid: torch.Tensor
    num_new: int
    span: int
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict, repr=False)
    _device: torch.device = field(default=torch.device("cpu"), repr=False)

    def to(self, device: torch.device) -> StepBatch:
        """Place the index tensors the forward uses on ``device``."""
        self._device = device
        return self

    @property
    def slot_range(self) -> tuple[int, int] | None:
        """``(first, end)`` when the slots are consecutive, so the cache is sliced rather than gathered."""
        first = int(self.slots[0])
        if torch.equal(self.slots, torch.arange(first, first + self.slots.numel())):
            return first, first + int(self.slots.numel())
        return None

    @property
    def uniform_start(self) -> int | None:
        """The common start position when every row continues from the same length."""
        first = int(self.starts[0])
        return first if bool((self.starts == first).all()) else None

    def positions(self) -> torch.Tensor:
        """``[B, T]`` position of every new token."""
        return (self.starts[:, None] + torch.arange(self.num_new)).to(self._device)

    def last_hidden(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` ``[B, T, C]`` at each row's last valid token: ``[B, 1, C]``."""
        last = (self.valid - 1).to(h.device)
        return h[torch.arange(h.shape[0], device=h.device), last][:, None]

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: tuple[torch.Tensor, torch.Tensor],
        scale: float,
        window: int | None,
    ) -> torch.Tensor:
        """Store ``k, v`` ``[B, KV, T, D]`` in the slots and attend ``q`` ``[B, H, T, D]`` over their prefixes."""
        keys, values = write_and_read(cache[0], cache[1], k, v, self)
        return attention(q, keys, values, self.mask(window), scale)

    def mask(self, window: int | None) -> torch.Tensor | None:
        """``[B, 1, T, span]`` boolean mask (True: attend), or ``None`` when every key is visible to every query.

        Query ``i`` of row ``b`` (position ``p = starts[b] + i``) sees key position ``j`` when
        ``j <= p`` and, with a sliding ``window``, ``p - j < window``.
        """
        if window not in self._masks:
            starts = self.uniform_start
            full = self.num_new == 1 and starts is not None and (window is None or self.span <= window)
            if full:
                self._masks[window] = None
            else:
                q = self.positions()[:, None, :, None]  # [B, 1, T, 1]
                k = torch.arange(self.span, device=self._device)[None, None, None, :]
                allowed = k <= q
                if window is not None:
                    allowed = allowed & (q - k < window)
                self._masks[window] = allowed
        return self._masks[window]


def write_and_read(
    cache_k: torch.Tensor, cache_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: StepBatch
) -> tuple[torch.Tensor, torch.Tensor]:
    """Store new keys/values ``[B, KV, T, D]`` at the batch's positions; return the attended ``[B, KV, span, D]``.

    Consecutive slots with a common start are written and read through slices (views, no copy);
    otherwise the rows are scattered in and gathered out.
    """
    rows = batch.slot_range
    start = batch.uniform_start
    if rows is not None and start is not None:
        first, end = rows
        cache_k[first:end, :, start : start + batch.num_new] = k
        cache_v[first:end, :, start : start + batch.num_new] = v
        return cache_k[first:end, :, : batch.span], cache_v[first:end, :, : batch.span]
    slots = batch.slots.to(cache_k.device)
    rows_bt = slots[:, None].expand(-1, batch.num_new)
    positions = batch.positions()
    # advanced indices on dims 0 and 2 around a slice: the indexed view is [B, T, KV, D]
    cache_k[rows_bt, :, positions] = k.transpose(1, 2)
    cache_v[rows_bt, :, positions] = v.transpose(1, 2)
    if rows is not None:
        first, end = rows
        return cache_k[first:end, :, : batch.span], cache_v[first:end, :, : batch.span]
    return cache_k[slots, :, : batch.span], cache_v[slots, :, : batch.span]
