"""Ulysses sequence parallelism (DeepSpeed's ``deepspeed.sequence``): all-to-all over heads."""

from deepshard.sequence.all_to_all import seq_all_to_all, split_sizes
from deepshard.sequence.layer import DistributedAttention
from deepshard.sequence.tiled import TiledLogitsLoss, TiledMLP, tiled_logits_loss

__all__ = [
    "DistributedAttention",
    "TiledLogitsLoss",
    "TiledMLP",
    "seq_all_to_all",
    "split_sizes",
    "tiled_logits_loss",
]
