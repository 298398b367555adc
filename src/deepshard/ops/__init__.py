"""``deepshard.ops``: deepshard's own kernels under DeepSpeed's ``deepspeed.ops`` path.

Pure PyTorch (optional Triton on GPU, imported lazily). DeepSpeed's other ``deepspeed.ops.*`` paths
(``adam``, ``lamb``, ...) are served from the compat table (:mod:`deepshard.compat.table`).
"""

from __future__ import annotations

import importlib
from types import ModuleType


def __getattr__(name: str) -> ModuleType:
    """``deepshard.ops.<name>`` for a DeepSpeed ops module served from the compat table (``ops.adam``, ...)."""
    from deepshard.compat.table import PATHS

    if f"ops.{name}" in PATHS:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
