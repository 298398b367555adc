"""``init_inference``'s configuration: DeepSpeed 0.19's ``DeepSpeedInferenceConfig`` keys, aliases and defaults.

The tree is parsed by the training config's machinery (:mod:`deepshard.config`): unknown keys are
refused with the dotted path and the closest key, recognised keys that deepshard does not implement
are refused unless they hold a value that asks for nothing, and type errors name the path.

DeepSpeed's ``dtype`` default is ``torch.float16``; deepshard keeps it (pass ``dtype=torch.float32``
for exact comparisons on CPU). ``quant.weight.post_init_quant`` uses the entry format of DeepSpeed's
group-wise ``weight_quantization.post_init_quant`` (module-name substring -> ``num_bits``,
``group_size``, ``group_dim``, ``symmetric``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import BeforeValidator, Field, ValidationError

from deepshard.config import ConfigError, NotSupportedYetError, ZeroConfig
from deepshard.config._source import read_source
from deepshard.config._types import (
    Int,
    StrictModel,
    Unsupported,
    empty,
    equals,
    unsupported,
)
from deepshard.config._walk import auto_error, convert_validation_error, find_auto, prepare
from deepshard.config.errors import show

InferenceDTypeName = Literal["fp32", "fp16", "bf16", "int8"]

_DTYPE_NAMES: dict[str, InferenceDTypeName] = {
    **dict.fromkeys(["fp32", "float32", "float", "torch.float32"], "fp32"),
    **dict.fromkeys(["fp16", "float16", "half", "torch.float16"], "fp16"),
    **dict.fromkeys(["bf16", "bfloat16", "bfloat", "torch.bfloat16"], "bf16"),
    **dict.fromkeys(["int8", "torch.int8"], "int8"),
}
_TORCH_DTYPES: dict[InferenceDTypeName, torch.dtype] = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "int8": torch.int8,
}


def _dtype_name(value: Any) -> Any:
    """DeepSpeed accepts a ``torch.dtype`` or any spelling of ``DtypeEnum``; normalise to a short name."""
    if isinstance(value, torch.dtype):
        for name, dtype in _TORCH_DTYPES.items():
            if dtype == value:
                return name
        raise ValueError(f"unsupported torch dtype {value}; use torch.float32, torch.float16 or torch.bfloat16")
    if isinstance(value, str):
        found = _DTYPE_NAMES.get(value.strip().lower())
        if found is None:
            raise ValueError(f"expected a dtype such as 'fp32', 'fp16', 'bf16' or torch.float32, got {value!r}")
        return found
    return value


InferenceDType = Annotated[InferenceDTypeName, BeforeValidator(_dtype_name)]


def torch_dtype(name: InferenceDTypeName) -> torch.dtype:
    """The ``torch.dtype`` of a normalised dtype name."""
    return _TORCH_DTYPES[name]


class TensorParallelConfig(StrictModel):
    """``tensor_parallel`` (alias ``tp``): split the model across ranks (DeepSpeed's ``DeepSpeedTPConfig``)."""

    NOT_SUPPORTED: ClassVar[dict[str, Unsupported]] = {
        "mpu": unsupported("a model-parallel unit object giving the TP group", equals(None)),
        "tp_group": unsupported("an existing process group for tensor parallelism", equals(None)),
    }

    enabled: bool = Field(default=True, description="Turn tensor parallelism on/off.")
    tp_size: Int = Field(
        default=1, ge=1, description="Ranks the model is split across by automatic tensor parallelism (Llama-family models, "
        "`replace_with_kernel_inject: false`); see docs/inference.md."
    )
    tp_grain_size: Int = Field(
        default=64, gt=0, description="Granularity of MLP / LM-head splits (AutoTP); no effect at `tp_size: 1`."
    )


class PostInitQuantEntry(StrictModel):
    """One entry of ``quant.weight.post_init_quant``: how the matching ``nn.Linear`` weights are stored."""

    num_bits: Literal[4, 8] = Field(description="Bits per weight: 8 (int8) or 4 (two weights per byte).")
    group_size: Int = Field(gt=0, description="Weights per scale along the input dimension.")
    group_dim: Literal[1] = Field(
        default=1, description="Dimension the groups run along; `1` (the input dimension of `[out, in]`) only."
    )
    symmetric: bool = Field(
        default=False,
        description="`true`: scale only (zero point 0); `false`: scale and zero point per group (DeepSpeed's only mode).",
    )


class WeightQuantConfig(StrictModel):
    """``quant.weight``: weight-only quantization of linear layers."""

    NOT_SUPPORTED: ClassVar[dict[str, Unsupported]] = {
        "quantized_initialization": unsupported("quantize weights while the model is built", empty()),
    }

    enabled: bool = Field(default=True, description="Quantize weights when `post_init_quant` names modules.")
    num_bits: Int = Field(default=8, description="MoQ bits (DeepSpeed's int8 `dtype` path); no effect here.")
    q_type: Literal["symmetric", "asymmetric"] = Field(default="symmetric", description="MoQ type; no effect here.")
    q_groups: Int = Field(default=1, gt=0, description="MoQ groups; no effect here.")
    post_init_quant: dict[str, PostInitQuantEntry] = Field(
        default_factory=dict,
        description="Module-name substring -> quantization of every `nn.Linear` whose name contains it "
        "(e.g. `{\"mlp\": {\"num_bits\": 4, \"group_size\": 32}}`); a module matching two keys is an error.",
    )


class ActivationQuantConfig(StrictModel):
    """``quant.activation``: DeepSpeed's MoQ activation quantization (int8 ``dtype`` only)."""

    enabled: bool = Field(default=True, description="Only acts with `dtype: int8`, which deepshard refuses.")
    num_bits: Int = Field(default=8, description="No effect (int8 `dtype` only).")
    q_type: Literal["symmetric", "asymmetric"] = Field(default="symmetric", description="No effect.")
    q_groups: Int = Field(default=1, gt=0, description="No effect.")


class QKVQuantConfig(StrictModel):
    """``quant.qkv``."""

    enabled: bool = Field(default=True, description="No effect (int8 `dtype` only).")


class QuantizationConfig(StrictModel):
    """``quant``: quantization. deepshard implements weight-only group-wise int8/int4 (`weight.post_init_quant`)."""

    enabled: bool = Field(default=True, description="Master switch of `quant`.")
    activation: ActivationQuantConfig = Field(default=ActivationQuantConfig(), description="See `quant.activation`.")
    weight: WeightQuantConfig = Field(default=WeightQuantConfig(), description="See `quant.weight`.")
    qkv: QKVQuantConfig = Field(default=QKVQuantConfig(), description="See `quant.qkv`.")


class InferenceCheckpointConfig(StrictModel):
    """``checkpoint_config`` (alias ``ckpt_config``)."""

    NOT_SUPPORTED: ClassVar[dict[str, Unsupported]] = {
        "checkpoint_dir": unsupported("loading weights from a checkpoint directory", equals(None)),
        "save_mp_checkpoint_path": unsupported("saving a re-sharded checkpoint", equals(None)),
        "base_dir": unsupported("the checkpoint root directory", equals(None)),
    }


_MOE_INERT = Unsupported("", "`{}` or `false` (no MoE layers)", lambda v: v == {} or v is False)


class InferenceConfig(StrictModel):
    """The validated, immutable configuration of :func:`deepshard.init_inference`."""

    ALIASES: ClassVar[dict[str, str]] = {
        "kernel_inject": "replace_with_kernel_inject",
        "tp": "tensor_parallel",
        "ckpt_config": "checkpoint_config",
        "max_tokens": "max_out_tokens",
        "min_tokens": "min_out_tokens",
    }
    NOT_SUPPORTED: ClassVar[dict[str, Unsupported]] = {
        "enable_cuda_graph": unsupported("CUDA-graph capture of the forward", equals(False)),
        "use_triton": unsupported("DeepSpeed's Triton inference kernels", equals(False)),
        "triton_autotune": unsupported("autotuning of the Triton kernels", equals(False)),
        "triangular_masking": unsupported("non-causal masking in injected decoder layers", equals(True)),
        "tm": unsupported("non-causal masking in injected decoder layers", equals(True)),
        "moe": unsupported("MoE inference kernels and expert parallelism", _MOE_INERT),
        "checkpoint": unsupported("loading weights from a DeepSpeed checkpoint or load-policy JSON", equals(None)),
        "base_dir": unsupported("the root directory of `checkpoint`'s files", equals("")),
        "set_empty_params": unsupported("building the injected module with empty tensors", equals(False)),
        "save_mp_checkpoint_path": unsupported("saving a re-sharded checkpoint after loading", equals(None)),
        "return_tuple": unsupported("injected layers returning a tensor instead of a tuple", equals(True)),
        "training_mp_size": unsupported("the model-parallel size a loaded checkpoint was trained with", equals(1)),
        "transposed_mode": unsupported("transposed weight layout of DeepSpeed's kernels", equals(False)),
        "injection_policy": unsupported(
            "a user tensor-parallel policy (needs AutoTP, tp_size > 1)", equals(None)
        ),
        "injection_dict": unsupported("a user tensor-parallel policy (needs AutoTP, tp_size > 1)", equals(None)),
        "injection_policy_tuple": unsupported("the tuple form of `injection_policy`", equals(None)),
        "config": unsupported("a model config dict for injection", equals(None)),
        "args": unsupported("a model config dict for injection", equals(None)),
        "mp_size": unsupported("deprecated: tensor_parallel.tp_size", equals(1)),
        "mpu": unsupported("deprecated: tensor_parallel.mpu", equals(None)),
        "ep_size": unsupported("deprecated: moe.ep_size", equals(1)),
        "ep_group": unsupported("deprecated: moe.ep_group", equals(None)),
        "expert_group": unsupported("deprecated: moe.ep_group", equals(None)),
        "ep_mp_group": unsupported("deprecated: moe.ep_mp_group", equals(None)),
        "expert_mp_group": unsupported("deprecated: moe.ep_mp_group", equals(None)),
        "moe_experts": unsupported("deprecated: moe.moe_experts", equals([1])),
        "moe_type": unsupported("deprecated: moe.type", equals("standard")),
    }

    replace_with_kernel_inject: bool = Field(
        default=False,
        description="Replace the decoder layers of supported Hugging Face models (Llama, Mistral, Qwen2, GPT-2, OPT) "
        "by deepshard's fused layers over a preallocated KV cache; see docs/inference.md.",
    )
    dtype: InferenceDType = Field(
        default="fp16",
        description="dtype the model is converted to: a torch dtype or a DeepSpeed spelling. DeepSpeed's default "
        "`torch.float16` is kept. `int8` (MoQ) is not supported; use `quant.weight.post_init_quant`.",
    )
    tensor_parallel: TensorParallelConfig = Field(
        default=TensorParallelConfig(), description="Tensor parallelism; see `tensor_parallel`."
    )
    zero: ZeroConfig = Field(
        default=ZeroConfig(),
        description="ZeRO-Inference (`stage: 3` with `offload_param`); deepshard runs stage 0 (resident weights) only.",
    )
    keep_module_on_host: bool = Field(
        default=False, description="Leave the weights in host memory instead of moving them to the accelerator."
    )
    quant: QuantizationConfig = Field(default=QuantizationConfig(), description="Quantization; see `quant`.")
    checkpoint_config: InferenceCheckpointConfig = Field(
        default=InferenceCheckpointConfig(), description="Checkpoint locations (none supported yet)."
    )
    replace_method: str = Field(
        default="auto", description="Deprecated in DeepSpeed and without effect there; accepted without effect."
    )
    max_out_tokens: Int = Field(
        default=1024,
        gt=0,
        description="Most tokens (prompt + generated) a sequence may hold; the KV cache is sized to it.",
    )
    min_out_tokens: Int = Field(
        default=1,
        ge=0,
        description="`generate` refuses a prompt that leaves fewer than this many tokens of room under "
        "`max_out_tokens`.",
    )


def _check_supported(cfg: InferenceConfig) -> None:
    if cfg.dtype == "int8":
        raise NotSupportedYetError(
            "dtype=int8 (DeepSpeed's MoQ int8 kernels) is not implemented by deepshard; keep a float dtype and "
            'quantize weights with quant.weight.post_init_quant, e.g. {"": {"num_bits": 8, "group_size": 64}}.'
        )
    if cfg.tensor_parallel.enabled and cfg.tensor_parallel.tp_size != 1 and cfg.replace_with_kernel_inject:
        raise NotSupportedYetError(
            f"tensor_parallel.tp_size={cfg.tensor_parallel.tp_size} with replace_with_kernel_inject=true: the fused "
            "layers are not split across ranks yet; use replace_with_kernel_inject=false (automatic tensor "
            "parallelism of the Hugging Face model) or tp_size=1."
        )
    if cfg.zero.stage != 0:
        raise NotSupportedYetError(
            f"zero.stage={cfg.zero.stage}: ZeRO-Inference (weights streamed from host memory or NVMe) is not "
            "implemented yet; remove the zero section (resident weights) to continue."
        )


def load_inference_config(config: InferenceConfig | Mapping[str, Any] | str | None, **kwargs: Any) -> InferenceConfig:
    """Build an :class:`InferenceConfig` from ``config`` (a dict, a JSON path, or ``None``) and keyword arguments.

    As in DeepSpeed's ``init_inference``, keyword arguments are merged over the dict; a key given in both
    with different values is an error.

    Raises:
        ConfigError: for an unknown key (named with its dotted path), a bad value, or a conflict.
        NotSupportedYetError: for a DeepSpeed key or value that deepshard does not implement.
    """
    if isinstance(config, InferenceConfig):
        if kwargs:
            raise ConfigError(
                f"init_inference got an InferenceConfig and keyword arguments {sorted(kwargs)}; pass a dict to merge."
            )
        return config
    data = read_source(config) if config is not None else {}
    for key in set(data) & set(kwargs):
        if data[key] != kwargs[key]:
            raise ConfigError(
                f"Conflicting argument '{key}': the config has {show(data[key])} and the keyword argument "
                f"{show(kwargs[key])}; give it in one place."
            )
    data.update(kwargs)
    autos = [p for p in find_auto(data) if p != "replace_method"]  # "auto" is that key's real default
    if autos:
        raise auto_error(autos)
    cleaned = prepare(InferenceConfig, InferenceConfig, data)
    try:
        cfg = InferenceConfig.model_validate(cleaned)
    except ValidationError as exc:
        raise convert_validation_error(exc) from None
    _check_supported(cfg)
    return cfg


__all__ = [
    "InferenceConfig",
    "PostInitQuantEntry",
    "QuantizationConfig",
    "TensorParallelConfig",
    "load_inference_config",
    "torch_dtype",
]
