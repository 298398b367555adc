"""``deepshard.initialize`` and ``add_config_arguments``: DeepSpeed's entry points."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.data import Dataset

from deepshard import comm
from deepshard.config import ConfigError, DeepShardConfig, load_config
from deepshard.runtime.engine import DeepShardEngine, OptimizerLike


def add_config_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add DeepSpeed's ``--deepspeed``/``--deepspeed_config`` (and legacy ``--deepscale*``) arguments."""
    group = parser.add_argument_group("DeepSpeed", "DeepSpeed configurations")
    group.add_argument("--deepspeed", default=False, action="store_true", help="Enable deepshard (DeepSpeed flag).")
    group.add_argument("--deepspeed_config", default=None, type=str, help="Path to a DeepSpeed JSON config.")
    group.add_argument("--deepscale", default=False, action="store_true", help=argparse.SUPPRESS)
    group.add_argument("--deepscale_config", default=None, type=str, help=argparse.SUPPRESS)
    return parser


def _config_source(args: Any, config: Any, config_params: Any) -> Any:
    if config is None and config_params is not None:
        config = config_params
    from_args = None
    if args is not None:
        from_args = getattr(args, "deepspeed_config", None) or getattr(args, "deepscale_config", None)
    if from_args is not None and config is not None:
        raise ConfigError(
            f"a config was given twice: args.deepspeed_config={from_args!r} and config=...; pass only one of them."
        )
    source = config if config is not None else from_args
    if source is None:
        raise ConfigError(
            "no config: pass config=<dict or path to ds_config.json>, or args with --deepspeed_config "
            "(see deepshard.add_config_arguments)."
        )
    return source


def _dp_world_size(mpu: Any) -> int:
    if mpu is not None:
        return int(mpu.get_data_parallel_world_size())
    return comm.get_world_size()


def _check_half_precision_speed(cfg: DeepShardConfig) -> None:
    """Warn once when the config's bf16/fp16 would run emulated on this CPU (measured, see throughput)."""
    from deepshard.accelerator import get_accelerator
    from deepshard.precision.throughput import warn_if_half_precision_is_slow

    dtype = torch.bfloat16 if cfg.bf16.enabled else torch.float16 if cfg.fp16.enabled else None
    if dtype is not None:
        warn_if_half_precision_is_slow(dtype, get_accelerator().device_name())


def initialize(
    args: Any = None,
    model: torch.nn.Module | None = None,
    optimizer: OptimizerLike | None = None,
    model_parameters: Iterable[Any] | None = None,
    training_data: Dataset[Any] | None = None,
    lr_scheduler: Any = None,
    mpu: Any = None,
    dist_init_required: bool | None = None,
    collate_fn: Callable[..., Any] | None = None,
    config: dict[str, Any] | str | DeepShardConfig | None = None,
    config_params: dict[str, Any] | str | None = None,
) -> tuple[DeepShardEngine, torch.optim.Optimizer | None, Any, Any]:
    """Build the training engine, as ``deepspeed.initialize`` does.

    Returns ``(engine, optimizer, training_dataloader, lr_scheduler)``; the dataloader is ``None``
    unless ``training_data`` is given. The process group is created from the launcher's environment
    when needed (a single process without one runs without a group).
    """
    if model is None:
        raise ValueError("initialize() needs model=<torch.nn.Module>")
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    source = _config_source(args, config, config_params)
    comm.init_distributed(dist_init_required=dist_init_required, verbose=False)
    cfg = load_config(source, dp_world_size=_dp_world_size(mpu))
    _check_half_precision_speed(cfg)
    engine = DeepShardEngine(
        model=model,
        config=cfg,
        optimizer=optimizer,
        model_parameters=model_parameters,
        lr_scheduler=lr_scheduler,
        training_data=training_data,
        collate_fn=collate_fn,
        mpu=mpu,
    )
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler
