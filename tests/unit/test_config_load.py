"""Sources, strictness, "auto", duplicates, aliases, types and feature gating of deepshard.config."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from deepshard.config import ConfigError, DeepShardConfig, NotSupportedYetError, load_config

BASE = {"train_batch_size": 8}


def cfg_with(**extra: object) -> dict:
    return {**BASE, **extra}


def raises(exc: type[Exception], data: object, match: str, **kw: object) -> str:
    with pytest.raises(exc, match=match) as info:
        load_config(data, **kw)  # type: ignore[arg-type]
    return str(info.value)


# --- sources ---------------------------------------------------------------------------------


def test_dict_source_is_not_mutated() -> None:
    data = {"train_batch_size": 8, "bfloat16": {"enabled": True}}
    cfg = load_config(data, dp_world_size=2)
    assert data == {"train_batch_size": 8, "bfloat16": {"enabled": True}}
    assert cfg.train_micro_batch_size_per_gpu == 4 and cfg.bf16.enabled


def test_path_sources(tmp_path: Path) -> None:
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps(cfg_with(zero_optimization={"stage": 0})))
    assert load_config(path).train_batch_size == 8
    assert load_config(str(path)).train_batch_size == 8


def test_base64_source() -> None:
    encoded = base64.urlsafe_b64encode(json.dumps(BASE).encode()).decode()
    assert load_config(encoded, dp_world_size=4).train_micro_batch_size_per_gpu == 2


def test_missing_file_and_garbage_string() -> None:
    raises(ConfigError, Path("/nonexistent/ds.json"), "Config file '/nonexistent/ds.json' does not exist")
    msg = raises(ConfigError, "/nonexistent/ds_config.json", "neither an existing file")
    assert "it looks like a file path" in msg


def test_invalid_json_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{"train_batch_size": 8,\n}')
    raises(ConfigError, path, r"is not valid JSON: .* at line 2, column 1")


def test_top_level_must_be_object(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    raises(ConfigError, path, r"must be a JSON object at the top level, got \[1, 2\]")


def test_built_config_returned_as_is_or_re_resolved() -> None:
    cfg = load_config(cfg_with(train_micro_batch_size_per_gpu=2), dp_world_size=2)
    assert load_config(cfg, dp_world_size=2) is cfg
    with pytest.raises(ConfigError, match=r"train_batch_size=8 is not divisible by .* = 2 \* 3 = 6"):
        load_config(cfg, dp_world_size=3)
    again = load_config(cfg, dp_world_size=1)
    assert again.gradient_accumulation_steps == 4 and again.dp_world_size == 1


def test_raw_is_the_original_and_read_only() -> None:
    cfg = load_config(
        cfg_with(bfloat16={"enabled": True}, optimizer={"type": "Adam", "params": {"betas": [0.9, 0.99]}})
    )
    assert cfg.raw["bfloat16"]["enabled"] is True
    assert cfg.raw["optimizer"]["params"]["betas"] == (0.9, 0.99)
    with pytest.raises(TypeError):
        cfg.raw["train_batch_size"] = 1  # type: ignore[index]


def test_config_is_frozen() -> None:
    cfg = load_config(BASE)
    with pytest.raises(ValueError, match="frozen"):
        cfg.gradient_clipping = 0.5  # type: ignore[misc]


# --- duplicates, "auto", unknown keys ----------------------------------------------------------


def test_duplicate_json_key(tmp_path: Path) -> None:
    path = tmp_path / "dup.json"
    path.write_text('{"train_batch_size": 8, "zero_optimization": {"stage": 0, "stage": 0}}')
    raises(ConfigError, path, "Duplicate key 'stage' in config file .*dup.json")


def test_duplicate_key_in_base64() -> None:
    encoded = base64.urlsafe_b64encode(b'{"train_batch_size": 8, "train_batch_size": 16}').decode()
    raises(ConfigError, encoded, "Duplicate key 'train_batch_size' in the base64-encoded config")


def test_auto_values_are_refused_with_paths() -> None:
    data = cfg_with(
        gradient_accumulation_steps="auto", optimizer={"type": "AdamW", "params": {"betas": ["auto", 0.9]}}
    )
    msg = raises(ConfigError, data, "must resolve before the config reaches deepshard")
    assert "'gradient_accumulation_steps', 'optimizer.params.betas[0]' are \"auto\"" in msg
    assert "Hugging Face Trainer or Accelerate" in msg


def test_single_auto_value() -> None:
    raises(ConfigError, cfg_with(fp16={"enabled": "auto"}), r"^'fp16.enabled' is \"auto\"")


def test_top_level_typo_suggests_zero_optimization() -> None:
    msg = raises(
        ConfigError, cfg_with(zero_optimisation={"stage": 0}), "Unknown config key 'zero_optimisation'"
    )
    assert msg.endswith("Did you mean 'zero_optimization'?")


def test_nested_typo_names_dotted_path() -> None:
    data = cfg_with(zero_optimization={"reduce_bucket_sizee": 5e8})
    msg = raises(ConfigError, data, re.escape("Unknown config key 'zero_optimization.reduce_bucket_sizee'"))
    assert msg.endswith("Did you mean 'reduce_bucket_size'?")


def test_deep_typo_in_offload() -> None:
    data = cfg_with(zero_optimization={"offload_optimizer": {"devise": "none"}})
    raises(ConfigError, data, r"'zero_optimization.offload_optimizer.devise' .* Did you mean 'device'\?")


def test_key_at_wrong_level_points_to_its_home() -> None:
    msg = raises(ConfigError, cfg_with(stage=0), "Unknown config key 'stage'")
    assert "'stage' is valid only as 'zero_optimization.stage'; move it there." in msg


def test_unknown_key_without_suggestion() -> None:
    raises(
        ConfigError, cfg_with(fp16={"xyzzy": 1}), "Unknown config key 'fp16.xyzzy' .*listed in docs/config.md"
    )


# --- not supported yet -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("eigenvalue", {"enabled": True}),
        ("nebula", {"enabled": True, "persistent_storage_path": "x"}),
        ("activation_checkpointing", {"partition_activations": True}),
        ("pipeline", {"stages": 2}),
        ("sparse_gradients", True),
        ("gradient_allreduce_op", "sum"),
        ("elasticity", {"enabled": True}),
        ("datastates_ckpt", {}),
    ],
)
def test_unsupported_top_level_keys(key: str, value: object) -> None:
    msg = raises(NotSupportedYetError, cfg_with(**{key: value}), f"^'{key}' ")
    assert "is a DeepSpeed key that deepshard does not support yet; remove it" in msg


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("eigenvalue", {"enabled": False, "max_iter": 5}),
        ("nebula", {}),
        ("activation_checkpointing", {"partition_activations": False, "number_checkpoints": None}),
        ("sparse_gradients", False),
        ("gradient_allreduce_op", "mean"),
        ("checkpoint", {"tag_validation": "Warn"}),
    ],
)
def test_inert_unsupported_keys_are_accepted(key: str, value: object) -> None:
    cfg = load_config(cfg_with(**{key: value}))
    assert cfg.raw[key] is not None


def test_unsupported_nested_keys() -> None:
    data = cfg_with(zero_optimization={"cpu_offload": True})
    msg = raises(NotSupportedYetError, data, "'zero_optimization.cpu_offload'")
    assert 'use `offload_optimizer: {"device": "cpu"}`' in msg
    raises(
        NotSupportedYetError,
        cfg_with(bf16={"bf16_master_weights_and_grads": True}),
        "'bf16.bf16_master_weights",
    )
    assert (
        load_config(cfg_with(zero_optimization={"cpu_offload": None})).zero_optimization.offload_optimizer
        is None
    )


def test_zero_stage_3_is_accepted() -> None:
    cfg = load_config(cfg_with(zero_optimization={"stage": 3}))
    assert cfg.zero_optimization.stage == 3
    assert cfg.zero_optimization.effective_overlap_comm  # DeepSpeed: overlap defaults on at stage 3


@pytest.mark.parametrize(
    ("zero", "pattern"),
    [
        ({"stage": 2, "offload_param": {"device": "cpu"}}, r"offload_param.device='cpu' needs ZeRO stage 3"),
        ({"stage": 0, "offload_optimizer": {"device": "cpu"}}, r"offload_optimizer.device='cpu' needs ZeRO stage 1, 2 or 3"),
        ({"stage": 2, "offload_optimizer": {"device": "nvme"}}, r"offload_optimizer.nvme_path is not set"),
        ({"stage": 3, "offload_param": {"device": "nvme"}}, r"offload_param.nvme_path is not set"),
    ],
)
def test_offload_bad_combinations(zero: dict, pattern: str) -> None:
    raises(ConfigError, cfg_with(zero_optimization=zero), pattern)


def test_offload_devices_and_aio_section_are_accepted() -> None:
    cfg = load_config(
        cfg_with(
            zero_optimization={
                "stage": 3,
                "offload_optimizer": {"device": "nvme", "nvme_path": "/x", "pipeline_read": True},
                "offload_param": {"device": "cpu"},
            },
            aio={"block_size": 8192, "queue_depth": 4, "thread_count": 2, "single_submit": False},
        )
    )
    assert cfg.zero_optimization.offload_optimizer.device == "nvme"
    assert cfg.aio.intra_op_parallelism == 2 and cfg.aio.block_size == 8192 and cfg.aio.queue_depth == 4


def test_aio_block_size_must_be_aligned_and_gds_refused() -> None:
    raises(ConfigError, cfg_with(aio={"block_size": 1000}), r"aio.block_size=1000 is not a multiple of 4096")
    raises(NotSupportedYetError, cfg_with(aio={"use_gds": True}), r"aio.use_gds")


def test_partial_offload_is_refused_at_stage_3() -> None:
    data = cfg_with(zero_optimization={"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.5}})
    raises(NotSupportedYetError, data, r"offload_optimizer.ratio=0.5: deepshard does not implement partial")


def test_offload_device_none_is_accepted() -> None:
    cfg = load_config(
        cfg_with(zero_optimization={"offload_optimizer": {"device": "none", "pin_memory": False}})
    )
    assert cfg.zero_optimization.offload_optimizer is not None
    assert cfg.zero_optimization.offload_optimizer.pin_memory is False


# --- types and values --------------------------------------------------------------------------


def test_type_errors_name_path_value_and_expectation() -> None:
    msg = raises(ConfigError, cfg_with(fp16={"enabled": "yes", "loss_scale": -1}), "Invalid config values:")
    assert "fp16.enabled: got 'yes'; expected true or false." in msg
    assert "fp16.loss_scale: got -1; expected a value >= 0.0." in msg
    assert "pydantic" not in msg and "errors.pydantic.dev" not in msg


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            cfg_with(zero_optimization={"stage": 5}),
            "zero_optimization.stage: got 5; expected one of 0, 1, 2 or 3.",
        ),
        (cfg_with(zero_optimization=True), "zero_optimization: got true; expected an object."),
        (
            cfg_with(zero_optimization={"reduce_bucket_size": 1.5}),
            "reduce_bucket_size: expected an integer, got 1.5.",
        ),
        (cfg_with(zero_optimization={"reduce_bucket_size": "5e8"}), "got '5e8'; expected an integer."),
        (cfg_with(gradient_clipping=True), "gradient_clipping: got true; expected a number."),
        (cfg_with(gradient_clipping=float("inf")), "gradient_clipping: expected a finite number, got inf."),
        (cfg_with(steps_per_print=0), "steps_per_print: got 0; expected a value > 0."),
        (cfg_with(optimizer={"params": {}}), "optimizer.type: missing; this key is required."),
        (
            cfg_with(communication_data_type="int8"),
            "communication_data_type: expected one of 'fp32', 'fp16', 'bf16'",
        ),
        (
            cfg_with(zero_optimization={"offload_optimizer": {"ratio": 2}}),
            "ratio: got 2; expected a value <= 1.0.",
        ),
    ],
)
def test_bad_values(data: dict, expected: str) -> None:
    raises(ConfigError, data, re.escape(expected))


def test_big_ints_given_as_floats() -> None:
    cfg = load_config(
        cfg_with(zero_optimization={"reduce_bucket_size": 5e8, "stage3_max_live_parameters": 1e9})
    )
    assert cfg.zero_optimization.reduce_bucket_size == 500_000_000
    assert isinstance(cfg.zero_optimization.reduce_bucket_size, int)
    assert cfg.zero_optimization.stage3_max_live_parameters == 1_000_000_000


def test_fp16_and_bf16_together() -> None:
    data = cfg_with(fp16={"enabled": True}, bf16={"enabled": True})
    raises(ConfigError, data, "fp16.enabled and bf16.enabled are both true; choose one")


def test_partial_offload_needs_stage_3() -> None:
    data = cfg_with(zero_optimization={"offload_optimizer": {"ratio": 0.5}})
    raises(
        ConfigError,
        data,
        r"offload_optimizer.ratio=0.5: partial optimizer offload .* needs zero_optimization.stage 3",
    )


# --- aliases and normalisation -----------------------------------------------------------------


def test_bfloat16_alias() -> None:
    assert load_config(cfg_with(bfloat16={"enabled": True})).bf16.enabled
    raises(ConfigError, cfg_with(bfloat16={}, bf16={}), "Both 'bfloat16' and 'bf16' are set")


@pytest.mark.parametrize(
    "alias",
    [
        "gather_16bit_weights_on_model_save",
        "stage3_gather_fp16_weights_on_model_save",
        "stage3_gather_16bit_weights_on_model_save",
    ],
)
def test_gather_16bit_aliases(alias: str) -> None:
    cfg = load_config(cfg_with(zero_optimization={alias: True}))
    assert cfg.zero_optimization.stage3_gather_16bit_weights_on_model_save is True


def test_short_stage3_names() -> None:
    zero = load_config(
        cfg_with(zero_optimization={"prefetch_bucket_size": 10, "max_live_parameters": 7})
    ).zero_optimization
    assert zero.stage3_prefetch_bucket_size == 10 and zero.stage3_max_live_parameters == 7
    data = cfg_with(zero_optimization={"prefetch_bucket_size": 1, "stage3_prefetch_bucket_size": 2})
    raises(
        ConfigError,
        data,
        "Both 'zero_optimization.prefetch_bucket_size' and 'zero_optimization.stage3_prefetch",
    )


@pytest.mark.parametrize(
    ("spelling", "canonical"),
    [
        ("fp32", "fp32"),
        ("FP16", "fp16"),
        ("bfloat16", "bf16"),
        ("float16", "fp16"),
        ("torch.float32", "fp32"),
        ("half", "fp16"),
    ],
)
def test_dtype_spellings(spelling: str, canonical: str) -> None:
    cfg = load_config(cfg_with(communication_data_type=spelling, data_types={"grad_accum_dtype": spelling}))
    assert cfg.communication_data_type == canonical
    assert cfg.data_types.grad_accum_dtype == canonical


def test_overlap_comm_resolution() -> None:
    zero = load_config(BASE).zero_optimization
    assert zero.overlap_comm is None and zero.effective_overlap_comm is False
    assert load_config(
        cfg_with(zero_optimization={"overlap_comm": True})
    ).zero_optimization.effective_overlap_comm


def test_optimizer_and_scheduler_params_are_free() -> None:
    cfg = load_config(
        cfg_with(
            optimizer={"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.95], "anything": 1}},
            scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
        )
    )
    assert cfg.optimizer is not None and cfg.optimizer.type == "AdamW"
    assert cfg.optimizer.params == {"lr": 1e-3, "betas": [0.9, 0.95], "anything": 1}
    assert cfg.scheduler is not None and cfg.scheduler.params == {"warmup_num_steps": 10}
    raises(
        NotSupportedYetError,
        cfg_with(optimizer={"type": "Adam", "legacy_fusion": True}),
        "'optimizer.legacy_fusion'",
    )


def test_load_config_type_is_exported() -> None:
    assert isinstance(load_config(BASE), DeepShardConfig)


def test_unsupported_source_type() -> None:
    raises(ConfigError, 42, "Config source of type int is not supported")


@pytest.mark.parametrize(
    ("key", "value"),
    [("zero_hpz_partition_size", 2), ("zero_quantized_weights", True), ("mics_shard_size", 4),
     ("stage3_use_all_reduce_for_fetch_params", True), ("stage3_module_granularity_threshold", 100)],
)  # fmt: skip
def test_zero_features_not_built_are_refused(key: str, value: object) -> None:
    msg = raises(NotSupportedYetError, cfg_with(zero_optimization={"stage": 3, key: value}), f"zero_optimization.{key}=")
    assert "remove the key" in msg
