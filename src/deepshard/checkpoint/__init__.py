"""Checkpoints: DCP save/load with resharding, atomic commits, asynchronous saves, and export.

* :class:`Checkpointer` — what ``engine.save_checkpoint`` / ``load_checkpoint`` delegate to.
* :func:`get_fp32_state_dict_from_zero_checkpoint`, :func:`load_state_dict_from_zero_checkpoint` —
  DeepSpeed's ``zero_to_fp32`` API, without a process group.
* :func:`export_safetensors` — what ``deepshard convert`` runs.

The on-disk layout is described in :mod:`deepshard.checkpoint.layout` and ``docs/checkpoints.md``.
"""

from __future__ import annotations

from deepshard.checkpoint.export import (
    CheckpointReader,
    export_safetensors,
    get_fp32_state_dict_from_zero_checkpoint,
    load_state_dict_from_zero_checkpoint,
    save_16bit_model,
)
from deepshard.checkpoint.manifest import CorruptCheckpointError
from deepshard.checkpoint.saver import Checkpointer

__all__ = [
    "CheckpointReader",
    "Checkpointer",
    "CorruptCheckpointError",
    "export_safetensors",
    "get_fp32_state_dict_from_zero_checkpoint",
    "load_state_dict_from_zero_checkpoint",
    "save_16bit_model",
]
