"""DeepSpeed-compatible configuration: a typed, strict, frozen tree read from ``ds_config.json``.

>>> from deepshard.config import load_config
>>> cfg = load_config({"train_batch_size": 8, "zero_optimization": {"stage": 0}}, dp_world_size=2)
>>> cfg.train_micro_batch_size_per_gpu
4

Every key, its type, default and meaning is listed in ``docs/config.md``, generated from this
package by ``python -m deepshard.config.docs``.
"""

from deepshard.config._load import ConfigSource, load_config
from deepshard.config._precision import BF16Config, DataTypesConfig, FP16Config
from deepshard.config._schema import DeepShardConfig, OptimizerConfig, SchedulerConfig
from deepshard.config._zero import AioConfig, OffloadOptimizerConfig, OffloadParamConfig, ZeroConfig
from deepshard.config.errors import ConfigError, NotSupportedYetError
from deepshard.config.support import SUPPORTED_OFFLOAD_DEVICES, SUPPORTED_ZERO_STAGES

__all__ = [
    "BF16Config",
    "ConfigError",
    "ConfigSource",
    "DataTypesConfig",
    "DeepShardConfig",
    "FP16Config",
    "NotSupportedYetError",
    "AioConfig",
    "OffloadOptimizerConfig",
    "OffloadParamConfig",
    "OptimizerConfig",
    "SUPPORTED_OFFLOAD_DEVICES",
    "SUPPORTED_ZERO_STAGES",
    "SchedulerConfig",
    "ZeroConfig",
    "load_config",
]
