"""Compression: QAT, pruning, ``redundancy_clean``, layer reduction + KD, and ZeroQuant-style PTQ.

DeepSpeed's ``deepspeed.compression`` API: ``init_compression``, ``redundancy_clean``,
``student_initialization`` (in :mod:`deepshard.compression.compress`) and ``compression_scheduler``,
driven by the ``compression_training`` config section (:mod:`deepshard.config._compression`); plus
post-training quantization (:mod:`deepshard.compression.ptq`) and distillation losses
(:mod:`deepshard.compression.distill`). See docs/compression.md.

Names are imported lazily so that :mod:`deepshard.config` can import the config models alone.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "init_compression": "deepshard.compression.compress",
    "redundancy_clean": "deepshard.compression.compress",
    "student_initialization": "deepshard.compression.compress",
    "CompressionScheduler": "deepshard.compression.scheduler",
    "compression_scheduler": "deepshard.compression.scheduler",
    "CompressionConfig": "deepshard.config._compression",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name == "convert_conv1d_to_linear":
        raise NotImplementedError(
            "deepspeed.compression.convert_conv1d_to_linear (GPT-2 Conv1D -> nn.Linear) is not "
            "implemented in deepshard; GPT-2's Conv1D layers are not compressed."
        )
    raise AttributeError(f"module 'deepshard.compression' has no attribute {name!r}")
