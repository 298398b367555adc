"""Defaults equal DeepSpeed's (current source), and docs/config.md is the generated reference."""

from __future__ import annotations

import sys
from pathlib import Path

from deepshard.config import SUPPORTED_OFFLOAD_DEVICES, SUPPORTED_ZERO_STAGES, load_config
from deepshard.config.docs import main, render

DOCS = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_top_level_defaults() -> None:
    cfg = load_config({"train_micro_batch_size_per_gpu": 1})
    assert (cfg.train_batch_size, cfg.gradient_accumulation_steps) == (1, 1)
    assert cfg.steps_per_print is None
    assert cfg.gradient_clipping == 1.0
    assert cfg.wall_clock_breakdown is False and cfg.memory_breakdown is False
    assert cfg.prescale_gradients is False and cfg.gradient_predivide_factor == 1.0
    assert cfg.communication_data_type is None and cfg.dataloader_drop_last is False
    assert cfg.zero_allow_untested_optimizer is False and cfg.zero_force_ds_cpu_optimizer is True
    assert cfg.optimizer is None and cfg.scheduler is None
    assert cfg.data_types.grad_accum_dtype is None


def test_precision_defaults() -> None:
    cfg = load_config({"train_micro_batch_size_per_gpu": 1})
    fp16 = cfg.fp16
    assert (fp16.enabled, fp16.auto_cast, fp16.loss_scale, fp16.initial_scale_power) == (
        False,
        False,
        0.0,
        16,
    )
    assert (fp16.loss_scale_window, fp16.hysteresis, fp16.consecutive_hysteresis, fp16.min_loss_scale) == (
        1000,
        2,
        False,
        1,
    )
    assert fp16.dynamic_loss_scale and fp16.initial_dynamic_scale == 65536.0
    # check_grad_overflow: DeepSpeed 0.19.8's default is true (issue #14)
    assert (cfg.bf16.enabled, cfg.bf16.immediate_grad_update, cfg.bf16.check_grad_overflow) == (
        False,
        False,
        True,
    )


def test_zero_defaults() -> None:
    zero = load_config({"train_micro_batch_size_per_gpu": 1}).zero_optimization
    assert zero.stage == 0
    assert zero.contiguous_gradients and zero.reduce_scatter and zero.allgather_partitions
    assert zero.reduce_bucket_size == zero.allgather_bucket_size == 500_000_000
    assert zero.overlap_comm is None and zero.load_from_fp32_weights and not zero.elastic_checkpoint
    assert zero.offload_optimizer is None and zero.offload_param is None
    assert zero.sub_group_size == 1_000_000_000
    assert zero.stage3_prefetch_bucket_size == 50_000_000
    assert zero.stage3_param_persistence_threshold == 100_000
    assert zero.stage3_max_live_parameters == zero.stage3_max_reuse_distance == 1_000_000_000
    assert zero.stage3_model_persistence_threshold == sys.maxsize
    assert zero.stage3_gather_16bit_weights_on_model_save is False
    assert zero.ignore_unused_parameters and not zero.round_robin_gradients
    assert zero.zero_hpz_partition_size == 1 and zero.mics_shard_size == -1
    assert not (zero.zero_quantized_weights or zero.zero_quantized_gradients)


def test_offload_defaults() -> None:
    data = {"train_batch_size": 1, "zero_optimization": {"offload_optimizer": {}, "offload_param": {}}}
    zero = load_config(data).zero_optimization
    opt, par = zero.offload_optimizer, zero.offload_param
    assert opt is not None and par is not None
    assert (opt.device, opt.nvme_path, opt.buffer_count, opt.pin_memory, opt.ratio) == (
        "none",
        None,
        4,
        True,
        1.0,
    )
    assert not (opt.pipeline_read or opt.pipeline_write or opt.fast_init)
    assert (par.device, par.buffer_count, par.buffer_size, par.max_in_cpu, par.pin_memory) == (
        "none",
        5,
        100_000_000,
        1_000_000_000,
        True,
    )


def test_feature_gates() -> None:
    assert frozenset({0, 1, 2, 3}) == SUPPORTED_ZERO_STAGES
    assert frozenset({"none", "cpu", "nvme"}) == SUPPORTED_OFFLOAD_DEVICES


def test_docs_are_generated_from_the_schema() -> None:
    assert DOCS.read_text(encoding="utf-8") == render(), (
        "regenerate: python -m deepshard.config.docs docs/config.md"
    )


def test_docs_list_every_key() -> None:
    text = render()
    for key in (
        "`reduce_bucket_size`",
        "`stage3_gather_16bit_weights_on_model_save`",
        "`flops_profiler`",
        "`pin_memory`",
    ):
        assert key in text
    assert "## Recognised, not supported yet" in text


def test_docs_main_writes_file(tmp_path: Path) -> None:
    out = tmp_path / "config.md"
    assert main([str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render()
