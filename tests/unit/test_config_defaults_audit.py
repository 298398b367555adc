"""Every config default against DeepSpeed 0.19.8's (issue #14), key by key.

``DEEPSPEED_0_19_8`` was read from DeepSpeed 0.19.8 itself: the pydantic models' field defaults
(``DeepSpeedZeroConfig``, ``DeepSpeedZeroOffloadOptimizerConfig``, ``DeepSpeedZeroOffloadParamConfig``,
``DeepSpeedBF16Config``, ``DeepSpeedFP16Config``), ``AIO_DEFAULT_DICT``, and for the top-level keys
the values ``DeepSpeedConfig`` resolves for a config that sets none of them (and ``runtime/constants.py``
for keys it keeps as constants). A key deepshard models must have that default; a key it recognises
but does not implement must accept DeepSpeed's default as inert. docs/compat.md shows the table.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from deepshard.config import (
    AioConfig,
    BF16Config,
    DataTypesConfig,
    DeepShardConfig,
    FP16Config,
    OffloadOptimizerConfig,
    OffloadParamConfig,
    OptimizerConfig,
    ZeroConfig,
)
from deepshard.config._observability import (
    AutotuningConfig,
    CometConfig,
    CommsLoggerConfig,
    CSVConfig,
    FlopsProfilerConfig,
    TensorBoardConfig,
    WandbConfig,
)
from deepshard.config._schema import CheckpointConfig

DEEPSPEED_0_19_8 = {
    'steps_per_print': None,
    'wall_clock_breakdown': False,
    'memory_breakdown': False,
    'gradient_clipping': 1.0,
    'prescale_gradients': False,
    'gradient_predivide_factor': 1.0,
    'communication_data_type': None,
    'dataloader_drop_last': False,
    'zero_allow_untested_optimizer': False,
    'zero_force_ds_cpu_optimizer': True,
    'data_types.grad_accum_dtype': None,
    'data_types.param_dtype': None,
    'data_types.buffer_dtype': None,
    'disable_allgather': False,
    'dump_state': False,
    'disable_python_gc': False,
    'vocabulary_size': None,
    'gradient_allreduce_op': 'mean',
    'managed_gradient_accumulation': True,
    'seq_parallel_communication_data_type': 'fp32',
    'use_data_before_expert_parallelism': False,
    'log_level': None,
    'checkpoint.load_universal': False,
    'checkpoint.use_node_local_storage': False,
    'optimizer.legacy_fusion': False,
    'zero_optimization.stage': 0,
    'zero_optimization.contiguous_gradients': True,
    'zero_optimization.reduce_scatter': True,
    'zero_optimization.reduce_bucket_size': 500000000,
    'zero_optimization.use_multi_rank_bucket_allreduce': True,
    'zero_optimization.allgather_partitions': True,
    'zero_optimization.allgather_bucket_size': 500000000,
    'zero_optimization.overlap_comm': None,
    'zero_optimization.compute_grad_norm': True,
    'zero_optimization.load_from_fp32_weights': True,
    'zero_optimization.elastic_checkpoint': False,
    'zero_optimization.offload_param': None,
    'zero_optimization.offload_optimizer': None,
    'zero_optimization.zenflow': None,
    'zero_optimization.sub_group_size': 1000000000,
    'zero_optimization.cpu_offload_param': None,
    'zero_optimization.cpu_offload_use_pin_memory': None,
    'zero_optimization.cpu_offload': None,
    'zero_optimization.stage3_prefetch_bucket_size': 50000000,
    'zero_optimization.stage3_param_persistence_threshold': 100000,
    'zero_optimization.stage3_model_persistence_threshold': 9223372036854775807,
    'zero_optimization.stage3_max_live_parameters': 1000000000,
    'zero_optimization.stage3_max_reuse_distance': 1000000000,
    'zero_optimization.stage3_gather_16bit_weights_on_model_save': False,
    'zero_optimization.stage3_module_granularity_threshold': 0,
    'zero_optimization.stage3_use_all_reduce_for_fetch_params': False,
    'zero_optimization.stage3_allgather_sequential': False,
    'zero_optimization.stage3_gather_fp16_weights_on_model_save': False,
    'zero_optimization.ignore_unused_parameters': True,
    'zero_optimization.legacy_stage1': False,
    'zero_optimization.round_robin_gradients': False,
    'zero_optimization.parameter_alignment': False,
    'zero_optimization.zero_hpz_partition_size': 1,
    'zero_optimization.zero_quantized_weights': False,
    'zero_optimization.zero_quantized_nontrainable_weights': False,
    'zero_optimization.zero_quantized_gradients': False,
    'zero_optimization.memory_efficient_linear': True,
    'zero_optimization.pipeline_loading_checkpoint': False,
    'zero_optimization.override_module_apply': True,
    'zero_optimization.log_trace_cache_warnings': False,
    'zero_optimization.enable_sanity_checks': False,
    'zero_optimization.save_muon_momentum_buffer_in_memory': False,
    'zero_optimization.offload_optimizer.device': 'none',
    'zero_optimization.offload_optimizer.nvme_path': None,
    'zero_optimization.offload_optimizer.buffer_count': 4,
    'zero_optimization.offload_optimizer.pin_memory': True,
    'zero_optimization.offload_optimizer.pipeline_read': False,
    'zero_optimization.offload_optimizer.pipeline_write': False,
    'zero_optimization.offload_optimizer.fast_init': False,
    'zero_optimization.offload_optimizer.ratio': 1.0,
    'zero_optimization.offload_optimizer.super_offload': False,
    'zero_optimization.offload_optimizer.cpuadam_cores_perc': 0.8,
    'zero_optimization.offload_param.device': 'none',
    'zero_optimization.offload_param.nvme_path': None,
    'zero_optimization.offload_param.buffer_count': 5,
    'zero_optimization.offload_param.buffer_size': 100000000,
    'zero_optimization.offload_param.max_in_cpu': 1000000000,
    'zero_optimization.offload_param.pin_memory': True,
    'bf16.enabled': False,
    'bf16.immediate_grad_update': False,
    'bf16.check_grad_overflow': True,
    'bf16.bf16_master_weights_and_grads': False,
    'bf16.bf16_optimizer_states': False,
    'fp16.enabled': False,
    'fp16.auto_cast': False,
    'fp16.loss_scale': 0,
    'fp16.initial_scale_power': 16,
    'fp16.loss_scale_window': 1000,
    'fp16.hysteresis': 2,
    'fp16.consecutive_hysteresis': False,
    'fp16.min_loss_scale': 1,
    'fp16.fp16_master_weights_and_grads': False,
    'aio.block_size': 1048576,
    'aio.queue_depth': 8,
    'aio.intra_op_parallelism': 1,
    'aio.single_submit': False,
    'aio.overlap_events': True,
    'aio.use_gds': False,
    # deepspeed/monitor/config.py, profiling/constants.py, comm/constants.py (issue #22)
    'tensorboard.enabled': False,
    'tensorboard.output_path': '',
    'tensorboard.job_name': 'DeepSpeedJobName',
    'csv_monitor.enabled': False,
    'csv_monitor.output_path': '',
    'csv_monitor.job_name': 'DeepSpeedJobName',
    'wandb.enabled': False,
    'wandb.group': None,
    'wandb.team': None,
    'wandb.project': 'deepspeed',
    'comet.enabled': False,
    'comet.samples_log_interval': 100,
    'comet.project': None,
    'comet.workspace': None,
    'comet.api_key': None,
    'comet.experiment_name': None,
    'comet.experiment_key': None,
    'comet.online': None,
    'comet.mode': None,
    'flops_profiler.enabled': False,
    'flops_profiler.recompute_fwd_factor': 0.0,
    'flops_profiler.profile_step': 1,
    'flops_profiler.module_depth': -1,
    'flops_profiler.top_modules': 1,
    'flops_profiler.detailed': True,
    'flops_profiler.output_file': None,
    'comms_logger.enabled': False,
    'comms_logger.prof_all': True,
    'comms_logger.prof_ops': [],
    'comms_logger.verbose': False,
    'comms_logger.debug': False,
    # deepspeed/autotuning/constants.py
    'autotuning.enabled': False,
    'autotuning.fast': True,
    'autotuning.results_dir': 'autotuning_results',
    'autotuning.exps_dir': 'autotuning_exps',
    'autotuning.overwrite': True,
    'autotuning.start_profile_step': 3,
    'autotuning.end_profile_step': 5,
    'autotuning.metric_path': None,
    'autotuning.tuner_type': 'gridsearch',
    'autotuning.tuner_early_stopping': 5,
    'autotuning.tuner_num_trials': 50,
    'autotuning.arg_mappings': None,
    'autotuning.max_train_batch_size': None,
    'autotuning.min_train_batch_size': 1,
    'autotuning.max_train_micro_batch_size_per_gpu': 1024,
    'autotuning.min_train_micro_batch_size_per_gpu': 1,
    'autotuning.num_tuning_micro_batch_sizes': 3,
    'autotuning.mp_size': 1,
    'autotuning.metric': 'throughput',
    'autotuning.model_info_path': None,
    'autotuning.model_info': None,
}

SECTIONS: dict[str, type[BaseModel]] = {
    "": DeepShardConfig,
    "zero_optimization.": ZeroConfig,
    "zero_optimization.offload_optimizer.": OffloadOptimizerConfig,
    "zero_optimization.offload_param.": OffloadParamConfig,
    "bf16.": BF16Config,
    "fp16.": FP16Config,
    "aio.": AioConfig,
    "data_types.": DataTypesConfig,
    "checkpoint.": CheckpointConfig,
    "optimizer.": OptimizerConfig,
    "tensorboard.": TensorBoardConfig,
    "csv_monitor.": CSVConfig,
    "wandb.": WandbConfig,
    "comet.": CometConfig,
    "flops_profiler.": FlopsProfilerConfig,
    "comms_logger.": CommsLoggerConfig,
    "autotuning.": AutotuningConfig,
}


def _section(key: str) -> tuple[type[BaseModel], str]:
    prefix = max((p for p in SECTIONS if key.startswith(p)), key=len)
    return SECTIONS[prefix], key[len(prefix) :]


def ours(key: str) -> tuple[str, Any]:
    """``("field", default)``, ``("inert", bool)`` for a recognised-unsupported key, or ``("alias", None)``."""
    model, name = _section(key)
    fields = model.model_fields
    if name in fields:
        f = fields[name]
        default = f.default_factory() if f.default is PydanticUndefined and f.default_factory else f.default  # type: ignore[call-arg]
        return "field", default
    unsupported = getattr(model, "NOT_SUPPORTED", {})
    if name in unsupported:
        return "inert", unsupported[name].inert(DEEPSPEED_0_19_8[key])
    if name in getattr(model, "ALIASES", {}):
        return "alias", None
    raise AssertionError(f"{key}: a DeepSpeed 0.19.8 key deepshard's config does not know")


@pytest.mark.parametrize("key", sorted(DEEPSPEED_0_19_8))
def test_default_matches_deepspeed_0_19_8(key):
    kind, value = ours(key)
    expected = DEEPSPEED_0_19_8[key]
    if kind == "field":
        assert value == expected and type(value) in (type(expected), float, int), (key, value, expected)
    elif kind == "inert":
        assert value, f"{key}: DeepSpeed's default {expected!r} is refused as if it asked for something"


def test_infinite_steps_per_print_turns_the_report_off():
    # accelerate writes float("inf") to silence DeepSpeed's report
    from deepshard.config import load_config

    assert load_config({"train_batch_size": 1, "steps_per_print": float("inf")}).steps_per_print is None
