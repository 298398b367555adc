"""deepshard: ZeRO-style sharded training for PyTorch that reads DeepSpeed's ``ds_config.json``.

``import deepshard as deepspeed`` runs a DeepSpeed training script: ``initialize``, the engine's
``backward``/``step``, ``add_config_arguments``, ``init_distributed`` and ``comm``.
"""

from deepshard import comm
from deepshard.accelerator import get_accelerator
from deepshard.comm import init_distributed
from deepshard.config import ConfigError, DeepShardConfig
from deepshard.runtime.engine import DeepShardEngine
from deepshard.runtime.initialize import add_config_arguments, initialize
from deepshard.version import __version__

DeepSpeedEngine = DeepShardEngine  # the name DeepSpeed users type in isinstance checks

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
    "initialize",
]
