"""init_inference's config: DeepSpeed 0.19.8's DeepSpeedInferenceConfig keys, aliases and defaults, strictly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from deepshard.config import ConfigError, NotSupportedYetError
from deepshard.inference import load_inference_config


def test_defaults_are_deepspeeds() -> None:
    # values read from deepspeed/inference/config.py (DeepSpeedInferenceConfig and its sub-models)
    cfg = load_inference_config(None)
    assert cfg.replace_with_kernel_inject is False
    assert cfg.dtype == "fp16"
    assert (cfg.tensor_parallel.enabled, cfg.tensor_parallel.tp_size, cfg.tensor_parallel.tp_grain_size) == (True, 1, 64)
    assert cfg.max_out_tokens == 1024 and cfg.min_out_tokens == 1
    assert cfg.keep_module_on_host is False and cfg.replace_method == "auto"
    assert cfg.zero.stage == 0
    q = cfg.quant
    assert q.enabled and q.weight.enabled and q.activation.enabled and q.qkv.enabled
    assert (q.weight.num_bits, q.weight.q_type, q.weight.q_groups, dict(q.weight.post_init_quant)) == (8, "symmetric", 1, {})


def test_aliases_kwargs_and_dtype_spellings(tmp_path: Path) -> None:
    path = tmp_path / "inf.json"
    path.write_text(json.dumps({"kernel_inject": True, "tp": {"tp_size": 1}, "max_tokens": 64}))
    cfg = load_inference_config(str(path), dtype=torch.bfloat16, min_tokens=2)
    assert (cfg.replace_with_kernel_inject, cfg.max_out_tokens, cfg.min_out_tokens, cfg.dtype) == (True, 64, 2, "bf16")
    for spelling, name in (("float", "fp32"), ("torch.float16", "fp16"), ("bfloat16", "bf16"), (torch.float32, "fp32")):
        assert load_inference_config({"dtype": spelling}).dtype == name


@pytest.mark.parametrize(
    ("data", "exc", "match"),
    [
        ({"tensor_parallel": {"tp_sise": 2}}, ConfigError, r"'tensor_parallel\.tp_sise'.*Did you mean 'tp_size'"),
        ({"max_out_tokens": 0}, ConfigError, r"max_out_tokens: got 0; expected a value > 0"),
        ({"dtype": "fp8"}, ConfigError, r"dtype: expected a dtype"),
        ({"quant": {"weight": {"post_init_quant": {"mlp": {"num_bits": 3, "group_size": 8}}}}}, ConfigError,
         r"quant\.weight\.post_init_quant\.mlp\.num_bits: got 3"),
        ({"quant": {"weight": {"post_init_quant": {"mlp": {"num_bits": 4, "group_sise": 8}}}}}, ConfigError,
         r"quant\.weight\.post_init_quant\.mlp"),
        ({"kernel_inject": True, "replace_with_kernel_inject": True}, ConfigError, "keep only one"),
        ({"enable_cuda_graph": True}, NotSupportedYetError, r"'enable_cuda_graph' \(CUDA-graph"),
        ({"tensor_parallel": {"tp_size": 2}, "replace_with_kernel_inject": True}, NotSupportedYetError,
         r"tensor_parallel\.tp_size=2 with replace_with_kernel_inject"),
        ({"zero": {"stage": 3}}, NotSupportedYetError, r"zero\.stage=3: ZeRO-Inference"),
        ({"zero": {"stag": 3}}, ConfigError, r"'zero\.stag'"),
        ({"dtype": "int8"}, NotSupportedYetError, r"dtype=int8.*post_init_quant"),
        ({"checkpoint": "/x.json"}, NotSupportedYetError, r"'checkpoint'"),
        ({"mp_size": 2}, NotSupportedYetError, r"'mp_size' \(deprecated: tensor_parallel\.tp_size\)"),
        ({"moe": True}, NotSupportedYetError, r"'moe'"),
    ],
)
def test_bad_keys_name_the_dotted_path(data: dict, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        load_inference_config(data)


def test_inert_deepspeed_values_are_accepted() -> None:
    cfg = load_inference_config({"enable_cuda_graph": False, "moe": {}, "mp_size": 1, "triangular_masking": True,
                                 "checkpoint": None, "return_tuple": True, "replace_method": "auto"})
    assert cfg.max_out_tokens == 1024


def test_conflicting_kwargs_are_an_error() -> None:
    with pytest.raises(ConfigError, match="Conflicting argument 'max_out_tokens'"):
        load_inference_config({"max_out_tokens": 8}, max_out_tokens=16)
    assert load_inference_config({"max_out_tokens": 8}, max_out_tokens=8).max_out_tokens == 8
