"""deepshard: ZeRO-style sharded training for PyTorch that reads DeepSpeed's ``ds_config.json``.

``import deepshard as deepspeed`` runs a DeepSpeed training script: ``initialize``, the engine's
``backward``/``step``, ``add_config_arguments``, ``init_distributed``, ``comm``, ``zero`` and the
DeepSpeed paths of :mod:`deepshard.compat.table` (``deepshard.ops.adam``, ``deepshard.utils.zero_to_fp32``,
...); :func:`deepshard.compat.install` makes an unmodified ``import deepspeed`` resolve here.

Names are imported lazily, so that ``deepshard`` tools that do not train (the launcher, the report)
start without loading the training stack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from deepshard.compat import _finder as _compat
from deepshard.version import __version__

_compat.finder()  # DeepSpeed's import paths under deepshard.<path> (deepshard.compat.table)

_LAZY = {
    "comm": ("deepshard.comm", None),
    "get_accelerator": ("deepshard.accelerator", "get_accelerator"),
    "init_distributed": ("deepshard.comm", "init_distributed"),
    "ConfigError": ("deepshard.config", "ConfigError"),
    "DeepShardConfig": ("deepshard.config", "DeepShardConfig"),
    "DeepShardEngine": ("deepshard.runtime.engine", "DeepShardEngine"),
    # the name DeepSpeed users type in isinstance checks
    "DeepSpeedEngine": ("deepshard.runtime.engine", "DeepShardEngine"),
    "add_config_arguments": ("deepshard.runtime.initialize", "add_config_arguments"),
    "initialize": ("deepshard.runtime.initialize", "initialize"),
    "init_inference": ("deepshard.inference.engine", "init_inference"),
}

__all__ = [
    "ConfigError",
    "DeepShardConfig",
    "DeepShardEngine",
    "DeepSpeedEngine",
    "__version__",
    "add_config_arguments",
    "comm",
    "get_accelerator",
    "init_distributed",
    "init_inference",
    "initialize",
]

if TYPE_CHECKING:
    from deepshard import comm as comm
    from deepshard.accelerator import get_accelerator as get_accelerator
    from deepshard.comm import init_distributed as init_distributed
    from deepshard.config import ConfigError as ConfigError
    from deepshard.config import DeepShardConfig as DeepShardConfig
    from deepshard.inference.engine import init_inference as init_inference
    from deepshard.runtime.engine import DeepShardEngine as DeepShardEngine
    from deepshard.runtime.engine import DeepShardEngine as DeepSpeedEngine
    from deepshard.runtime.initialize import add_config_arguments as add_config_arguments
    from deepshard.runtime.initialize import initialize as initialize


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(f"module 'deepshard' has no attribute {name!r}")
    if name in _LAZY:
        module_name, attr = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attr is None else getattr(module, attr)
    elif _compat.is_real(name):  # a subpackage is an attribute before anyone imports it (deepspeed.zero...)
        value = importlib.import_module(f"deepshard.{name}")
    else:  # DeepSpeed's other top-level names and paths (deepshard.compat.table)
        value = _compat.lookup("", name, "deepshard", extended=False)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
