"""The training runtime: engine, optimizers, LR schedules and the data loader.

Submodules are attributes before anyone imports them (``deepspeed.runtime.lr_schedules`` after a bare
``import deepspeed``, as accelerate reads it); DeepSpeed's other ``runtime.*`` paths (``runtime.zero``, ...)
come from :mod:`deepshard.compat.table` the same way.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
