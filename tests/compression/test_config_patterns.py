"""compression_training config (DeepSpeed's keys, defaults, strictness) and module pattern resolution."""

from __future__ import annotations

import pytest
from compress_models import TinyTransformer

from deepshard.compression.layers import Technique
from deepshard.compression.patterns import plan
from deepshard.config import ConfigError, load_config
from deepshard.config._compression import CompressionConfig, load_compression_config


def _section(technique: str, shared: dict, groups: dict) -> dict:
    return {"compression_training": {technique: {"shared_parameters": shared, "different_groups": groups}}}


def test_defaults_are_deepspeeds() -> None:
    # deepspeed/compression/constants.py (0.19.6)
    c = CompressionConfig()
    wq = c.weight_quantization.shared_parameters
    assert (
        wq.enabled,
        wq.schedule_offset,
        wq.quantize_groups,
        wq.quantization_type,
        wq.rounding,
        wq.quantize_weight_in_forward,
        wq.quantizer_kernel,
        wq.fp16_mixed_quantize.quantize_change_ratio,
    ) == (False, 0, 1, "symmetric", "nearest", False, False, 0.001)
    aq = c.activation_quantization.shared_parameters
    assert (aq.schedule_offset, aq.range_calibration, aq.quantization_type) == (1000, "dynamic", "symmetric")
    sp = c.sparse_pruning.shared_parameters
    assert (
        sp.method,
        sp.schedule_offset,
        sp.end,
        sp.block_pattern,
        sp.dense_ratio,
        sp.schedule_offset_stride,
    ) == ("l1", 1000, 1000, "4x1", 0.1, 1)
    assert (c.row_pruning.shared_parameters.method, c.row_pruning.shared_parameters.schedule_offset) == (
        "l1",
        1000,
    )
    assert (c.head_pruning.shared_parameters.method, c.head_pruning.shared_parameters.schedule_offset) == (
        "topk",
        1000,
    )
    assert c.channel_pruning.shared_parameters.method == "l1"
    g = load_compression_config(
        _section(
            "weight_quantization", {"enabled": True}, {"g": {"params": {"start_bits": 8, "target_bits": 4}}}
        )
    )
    group = g.weight_quantization.different_groups["g"]
    assert (group.modules, group.related_modules, group.params.quantization_period) == (["*"], None, 1)


def test_accepted_by_load_config_and_typos_name_the_path() -> None:
    cfg = load_config(
        {
            "train_batch_size": 2,
            **_section(
                "row_pruning", {"enabled": True}, {"rp": {"params": {"dense_ratio": 0.5}, "modules": "fc1"}}
            ),
        }
    )
    assert cfg.compression_training.row_pruning.different_groups["rp"].modules == ["fc1"]
    with pytest.raises(
        ConfigError, match=r"compression_training\.row_pruning\.shared_parameters\.methd'.*'method'"
    ):
        load_config({"train_batch_size": 2, **_section("row_pruning", {"methd": "l1"}, {})})
    with pytest.raises(ConfigError, match=r"different_groups\.rp\.params\.dense_ration"):
        load_compression_config(
            _section("row_pruning", {"enabled": True}, {"rp": {"params": {"dense_ration": 0.5}}})
        )
    with pytest.raises(ConfigError, match=r"different_groups is empty"):
        load_compression_config(_section("sparse_pruning", {"enabled": True}, {}))
    with pytest.raises(ConfigError, match=r"num_heads must be specified"):
        load_compression_config(
            _section("head_pruning", {"enabled": True}, {"h": {"params": {"dense_ratio": 0.5}}})
        )
    with pytest.raises(ConfigError, match=r"target_bits=8 exceeds start_bits=4"):
        load_compression_config(
            _section(
                "weight_quantization",
                {"enabled": True},
                {"g": {"params": {"start_bits": 4, "target_bits": 8}}},
            )
        )


def test_patterns_resolve_like_deepspeed() -> None:
    model = TinyTransformer(layers=2)
    cfg = load_compression_config(
        _section(
            "weight_quantization",
            {"enabled": True},
            {
                "attn": {
                    "params": {"start_bits": 8, "target_bits": 8},
                    "modules": ["attn.query", "attn.key"],
                },
                "rest": {"params": {"start_bits": 8, "target_bits": 8}, "modules": [r"fc\d"]},
            },
        )
    )
    plans = plan(model, cfg)
    assert [gp.modules for gp in plans] == [
        [["layers.0.attn.query", "layers.1.attn.query"], ["layers.0.attn.key", "layers.1.attn.key"]],
        [["layers.0.fc1", "layers.0.fc2", "layers.1.fc1", "layers.1.fc2"]],
    ]
    everything = plan(
        model,
        load_compression_config(
            _section(
                "weight_quantization",
                {"enabled": True},
                {"g": {"params": {"start_bits": 8, "target_bits": 8}}},
            )
        ),
    )
    # "*": every Linear / Embedding (norms are not compressible)
    assert len(everything[0].modules[0]) == 1 + 2 * 6 + 1
    dup = _section(
        "weight_quantization",
        {"enabled": True},
        {
            "a": {"params": {"start_bits": 8, "target_bits": 8}, "modules": ["fc1"]},
            "b": {"params": {"start_bits": 8, "target_bits": 8}, "modules": ["layers.0"]},
        },
    )
    with pytest.raises(ValueError, match="already in group 'a'"):
        plan(model, load_compression_config(dup))
    with pytest.raises(ValueError, match="selects no"):
        plan(
            model,
            load_compression_config(
                _section(
                    "weight_quantization",
                    {"enabled": True},
                    {"a": {"params": {"start_bits": 8, "target_bits": 8}, "modules": ["fc9"]}},
                )
            ),
        )
    rel = plan(
        model,
        load_compression_config(
            _section(
                "head_pruning",
                {"enabled": True, "num_heads": 4},
                {
                    "h": {
                        "params": {"dense_ratio": 0.5},
                        "modules": ["attn.output"],
                        "related_modules": [["attn.query", "attn.key", "attn.value"]],
                    }
                },
            )
        ),
    )
    assert rel[0].technique is Technique.HEAD_PRUNING
    assert rel[0].related[0][2] == ["layers.0.attn.value", "layers.1.attn.value"]
    with pytest.raises(ValueError, match="selects 1 modules but"):
        plan(
            model,
            load_compression_config(
                _section(
                    "row_pruning",
                    {"enabled": True},
                    {
                        "r": {
                            "params": {"dense_ratio": 0.5},
                            "modules": ["fc1"],
                            "related_modules": [["layers.0.fc2"]],
                        }
                    },
                )
            ),
        )
