"""``DistributedAttention``: DeepSpeed-Ulysses sequence parallelism around any local attention.

Each of the ``P`` ranks of the sequence group holds a contiguous block of ``S / P`` tokens. Before the
attention, q, k and v go through an all-to-all that trades the sequence split for a head split: every
rank then holds the *whole* sequence for ``H / P`` of the heads (uneven: the first ``H % P`` ranks get
one more head) and runs the unmodified local attention (causal masks stay correct, the sequence is whole
and in order). A second all-to-all brings the context back to the sequence split. Traffic per layer and
rank: ``4 * S * hidden / P`` elements, independent of ``P`` in total per link, which is what lets it scale.
"""

from __future__ import annotations

from typing import Any

import torch

from deepshard import comm
from deepshard.sequence.all_to_all import seq_all_to_all, split_sizes


class DistributedAttention(torch.nn.Module):
    """Ulysses attention with DeepSpeed's signature.

    Args:
        local_attention: called as ``local_attention(q, k, v, *args, **kwargs)`` on the full sequence and
            this rank's heads; returns the context in the layout of ``q``.
        sequence_process_group: the sp group (``None``: the default group; one rank: a plain call).
        scatter_idx: the heads dim of q/k/v (2 for DeepSpeed's ``[s, b, h, d]`` and ``[b, s, h, d]``).
        gather_idx: the sequence dim (0 for ``[s, b, h, d]``, 1 for ``[b, s, h, d]``).
    """

    def __init__(
        self,
        local_attention: Any,
        sequence_process_group: Any,
        scatter_idx: int = 2,
        gather_idx: int = 0,
        sp_stream: Any = None,
    ) -> None:
        super().__init__()
        if sp_stream is not None:
            raise ValueError(
                "DistributedAttention: sp_stream (overlapping the all-to-alls on a side stream) is not "
                "implemented by deepshard; pass sp_stream=None"
            )
        if scatter_idx == gather_idx:
            raise ValueError(
                f"DistributedAttention: scatter_idx and gather_idx must differ, both are {scatter_idx}"
            )
        self.local_attn = local_attention
        self.spg = sequence_process_group
        self.scatter_idx = scatter_idx
        self.gather_idx = gather_idx

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        """Attention over the whole sequence for inputs that hold this rank's block of it."""
        world = comm.get_world_size(self.spg)
        q, k, v = (
            seq_all_to_all(x, self.scatter_idx, self.gather_idx, self.spg) for x in (query, key, value)
        )
        context = self.local_attn(q, k, v, *args, **kwargs)
        heads = split_sizes(query.shape[self.scatter_idx], world)  # every rank's head count
        return seq_all_to_all(context, self.gather_idx, self.scatter_idx, self.spg, gather_sizes=heads)
