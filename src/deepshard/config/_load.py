"""``load_config``: from whatever the user passed to a validated :class:`DeepShardConfig`."""

from __future__ import annotations

import os
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from pydantic import ValidationError

from deepshard.config._batch import GAS, MICRO, TRAIN, resolve_batch_triad
from deepshard.config._schema import DeepShardConfig
from deepshard.config._source import read_source
from deepshard.config._walk import auto_error, convert_validation_error, find_auto, prepare
from deepshard.config.errors import ConfigError
from deepshard.config.support import check_supported

ConfigSource = DeepShardConfig | Mapping[str, Any] | str | os.PathLike[str]


def _freeze(value: Any) -> Any:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def _check_consistency(cfg: DeepShardConfig) -> None:
    """Rules that involve more than one key (DeepSpeed enforces the same ones)."""
    if cfg.fp16.enabled and cfg.bf16.enabled:
        raise ConfigError(
            "fp16.enabled and bf16.enabled are both true; choose one mixed-precision mode and set the other's "
            "'enabled' to false."
        )
    offload = cfg.zero_optimization.offload_optimizer
    if offload is not None and offload.ratio < 1.0 and cfg.zero_optimization.stage != 3:
        raise ConfigError(
            f"zero_optimization.offload_optimizer.ratio={offload.ratio}: partial optimizer offload (ratio < 1) "
            f"needs zero_optimization.stage 3, but stage is {cfg.zero_optimization.stage}; set ratio to 1.0."
        )
    zero = cfg.zero_optimization
    if zero.offload_param is not None and zero.offload_param.device != "none" and zero.stage != 3:
        raise ConfigError(
            f"zero_optimization.offload_param.device='{zero.offload_param.device}' needs ZeRO stage 3 (parameters are "
            f"only sharded there), but zero_optimization.stage is {zero.stage}; set stage to 3, or use "
            "offload_optimizer alone at stages 1-2."
        )
    if offload is not None and offload.device != "none" and zero.stage == 0:
        raise ConfigError(
            f"zero_optimization.offload_optimizer.device='{offload.device}' needs ZeRO stage 1, 2 or 3, but "
            "zero_optimization.stage is 0; set stage to at least 1."
        )
    for name, section in (("offload_optimizer", offload), ("offload_param", zero.offload_param)):
        if section is not None and section.device == "nvme" and not section.nvme_path:
            raise ConfigError(
                f"zero_optimization.{name}.device is 'nvme' but zero_optimization.{name}.nvme_path is not set; "
                "set it to a directory on a fast local disk."
            )
    if cfg.aio.block_size % 4096:
        raise ConfigError(
            f"aio.block_size={cfg.aio.block_size} is not a multiple of 4096 bytes, which O_DIRECT IO needs; "
            f"use e.g. {max(4096, cfg.aio.block_size // 4096 * 4096)}."
        )


def load_config(source: ConfigSource, *, dp_world_size: int = 1) -> DeepShardConfig:
    """Read, validate and resolve a DeepSpeed-compatible config.

    Args:
        source: a dict; the path (``str`` or ``os.PathLike``) of a JSON file; a base64-encoded JSON
            string (as DeepSpeed's launcher passes it); or a :class:`DeepShardConfig`, returned as is
            when it was resolved for the same ``dp_world_size`` and re-resolved from its ``raw`` otherwise.
        dp_world_size: number of data-parallel ranks, used to resolve the batch-size triad.

    Returns:
        An immutable :class:`DeepShardConfig` whose ``train_batch_size``,
        ``train_micro_batch_size_per_gpu`` and ``gradient_accumulation_steps`` are resolved ints.

    Raises:
        ConfigError: for an unreadable source, duplicate JSON keys, an ``"auto"`` value, an unknown
            key, a bad type or value, or inconsistent batch sizes; the message names the dotted path.
        NotSupportedYetError: for a DeepSpeed key or value that deepshard does not implement yet.
    """
    if isinstance(source, DeepShardConfig):
        if source.dp_world_size == dp_world_size:
            return source
        data = read_source(_thaw(source.raw))
    else:
        data = read_source(source)
    autos = find_auto(data)
    if autos:
        raise auto_error(autos)
    raw = _freeze(data)
    cleaned = prepare(DeepShardConfig, DeepShardConfig, data)
    triad = resolve_batch_triad(cleaned.get(TRAIN), cleaned.get(MICRO), cleaned.get(GAS), dp_world_size)
    cleaned.update(
        {
            TRAIN: triad.train_batch_size,
            MICRO: triad.train_micro_batch_size_per_gpu,
            GAS: triad.gradient_accumulation_steps,
        }
    )
    try:
        cfg = DeepShardConfig.model_validate(cleaned)
    except ValidationError as exc:
        raise convert_validation_error(exc) from None
    cfg._raw = raw
    cfg._dp_world_size = dp_world_size
    _check_consistency(cfg)
    check_supported(cfg)
    return cfg
