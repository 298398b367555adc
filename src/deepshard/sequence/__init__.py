"""Ulysses sequence parallelism (DeepSpeed's ``deepspeed.sequence``): all-to-all over heads."""

from deepshard.sequence.all_to_all import seq_all_to_all, split_sizes
from deepshard.sequence.layer import DistributedAttention

__all__ = ["DistributedAttention", "seq_all_to_all", "split_sizes"]
