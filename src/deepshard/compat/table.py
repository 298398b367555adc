"""The one table of DeepSpeed import paths deepshard serves, and what each name resolves to.

Keys are DeepSpeed module paths relative to the package (``"ops.adam"`` is ``deepspeed.ops.adam``;
``""`` is ``deepspeed`` itself). The same path is importable as ``deepshard.<path>`` and, with the
alias on (:func:`deepshard.compat.install`), as ``deepspeed.<path>``. A path whose module deepshard
already has under that name (``zero``, ``comm``, ``accelerator``, ``runtime.engine``,
``runtime.lr_schedules``, ``checkpointing`` once it exists, ...) is *not* listed: ``deepspeed.<path>``
is that module itself. Listed paths are one of:

* :class:`Entry`: a module made from the table. ``names`` maps each DeepSpeed name to
  ``"module:attribute"`` (the implementation) or to :class:`Refused` (DeepSpeed has it, deepshard does
  not: using it raises :class:`~deepshard.compat.DeepSpeedFeatureNotImplemented` naming the feature).
  ``extends`` names the deepshard module whose other names show through (for a DeepSpeed module
  that deepshard has under the same path but with fewer names).
* :class:`Refused`: the whole module is a DeepSpeed feature deepshard does not implement; importing
  it raises :class:`~deepshard.compat.DeepSpeedFeatureNotImplemented`.

Any other ``deepspeed.<path>`` fails at import with a message saying deepshard does not implement it.
``docs/compat.md`` lists what DeepSpeedExamples, transformers and accelerate import, marked works /
refused; ``tests/unit/test_compat.py`` checks every row of this table resolves.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True)
class Refused:
    """A DeepSpeed name or module deepshard does not implement: ``feature`` says what it is in DeepSpeed."""

    feature: str
    instead: str = ""


@dataclass(frozen=True)
class Entry:
    """A DeepSpeed module served from the table: its names, and the deepshard module it extends."""

    names: Mapping[str, str | Refused] = field(default_factory=dict)
    extends: str | None = None


DEEPSPEED_API_VERSION = "0.19.8"
"""The DeepSpeed release whose API, config keys and defaults deepshard follows."""

_MEM = "deepshard.profiling.memory_estimators"
_SPARSE = Refused("block-sparse attention kernels (DeepSpeed's Triton sparse attention)")
_ONEBIT = Refused("communication-compressed 1-bit optimizers", "use Adam, AdamW or Lamb")

PATHS: Mapping[str, Entry | Refused] = MappingProxyType(
    {
        "": Entry(
            extends="deepshard",
            names={
                "DeepSpeedConfigError": "deepshard.config:ConfigError",
                "tp_model_init": Refused("AutoTP tensor-parallel model init"),
                "PipelineModule": Refused("pipeline parallelism (PipelineModule)"),
                "PipelineEngine": Refused("pipeline parallelism (PipelineEngine)"),
                "DeepSpeedHybridEngine": Refused("the RLHF hybrid engine"),
            },
        ),
        "ops": Entry(extends="deepshard.ops"),
        "ops.adam": Entry(
            names={
                "DeepSpeedCPUAdam": "deepshard.runtime.optimizers:DeepSpeedCPUAdam",
                "FusedAdam": "deepshard.runtime.optimizers:FusedAdam",
                "ZenFlowCPUAdam": Refused("ZenFlow asynchronous offloaded optimizer updates"),
            }
        ),
        "ops.lamb": Entry(names={"FusedLamb": "deepshard.runtime.optimizers:Lamb"}),
        "ops.lion": Entry(
            names={
                "FusedLion": "deepshard.runtime.optimizers:Lion",
                "DeepSpeedCPULion": "deepshard.runtime.optimizers:Lion",
            }
        ),
        "ops.adagrad": Entry(names={"DeepSpeedCPUAdagrad": "torch.optim:Adagrad"}),
        "ops.sparse_attention": _SPARSE,
        "ops.transformer": Refused("DeepSpeed's fused CUDA transformer kernels (DeepSpeedTransformerLayer)"),
        "ops.op_builder": Refused("DeepSpeed's C++/CUDA op builders (deepshard compiles nothing)"),
        "runtime.utils": Entry(
            names={
                "move_to_device": "deepshard.compat.ds_utils:move_to_device",
                "see_memory_usage": "deepshard.compat.ds_utils:see_memory_usage",
                "clip_grad_norm_": "torch.nn.utils:clip_grad_norm_",
            }
        ),
        "runtime.zero": Entry(
            names={
                "GatheredParameters": "deepshard.zero:GatheredParameters",
                "Init": "deepshard.zero:Init",
                "register_external_parameter": "deepshard.zero:register_external_parameter",
                "unregister_external_parameter": "deepshard.zero:unregister_external_parameter",
            }
        ),
        "runtime.zero.partition_parameters": Entry(
            names={
                "GatheredParameters": "deepshard.zero:GatheredParameters",
                "Init": "deepshard.zero:Init",
                "register_external_parameter": "deepshard.zero:register_external_parameter",
                "zero_wrapper_for_fp_tensor_constructor": "deepshard.compat.ds_utils:zero_wrapper_for_fp_tensor_constructor",
                "_orig_torch_arange": "deepshard.compat.ds_utils:ORIGINAL_TORCH_ARANGE",
                "get_accelerator": "deepshard.accelerator:get_accelerator",
                "ZeroParamStatus": Refused("ZeRO-3's per-tensor ds_status attribute (deepshard keeps parameters' "
                                           "real shapes; see docs/zero3.md)"),
            }
        ),
        "runtime.zero.stage3": Entry(
            names={
                f"estimate_zero3_model_states_mem_needs{end}": f"{_MEM}:estimate_zero3_model_states_mem_needs{end}"
                for end in ("", "_all_live", "_all_cold")
            }
        ),
        "runtime.zero.stage_1_and_2": Entry(
            names={
                f"estimate_zero2_model_states_mem_needs{end}": f"{_MEM}:estimate_zero2_model_states_mem_needs{end}"
                for end in ("", "_all_live", "_all_cold")
            }
        ),
        "runtime.zero.config": Entry(names={"DeepSpeedZeroConfig": "deepshard.config:ZeroConfig"}),
        "runtime.zero.offload_config": Entry(
            names={
                "DeepSpeedZeroOffloadOptimizerConfig": "deepshard.config:OffloadOptimizerConfig",
                "DeepSpeedZeroOffloadParamConfig": "deepshard.config:OffloadParamConfig",
            }
        ),
        "runtime.fp16": Entry(),
        "runtime.fp16.loss_scaler": Entry(
            names={
                "DynamicLossScaler": "deepshard.precision:LossScaler",
                "LossScaler": "deepshard.precision:LossScaler",
            }
        ),
        "runtime.pipe": Refused("pipeline parallelism (deepspeed.pipe / runtime.pipe)"),
        "pipe": Refused("pipeline parallelism (deepspeed.pipe)"),
        "runtime.sequence_parallel": Refused("Ulysses sequence parallelism"),
        "runtime.activation_checkpointing": Refused("DeepSpeed's activation checkpointing"),
        "utils": Entry(
            extends="deepshard.utils",
            names={
                "set_z3_leaf_modules": "deepshard.zero:set_z3_leaf_modules",
                "unset_z3_leaf_modules": "deepshard.zero:unset_z3_leaf_modules",
                "get_z3_leaf_modules": "deepshard.zero:get_z3_leaf_modules",
                "z3_leaf_module": "deepshard.zero:z3_leaf_module",
                "see_memory_usage": "deepshard.compat.ds_utils:see_memory_usage",
                "OnDevice": Refused("OnDevice (building a model on the meta device or a chosen device)",
                                    "build the model under deepshard.zero.Init"),
            },
        ),
        "utils.zero_to_fp32": Entry(
            names={
                name: f"deepshard.checkpoint.zero_to_fp32:{name}"
                for name in (
                    "get_fp32_state_dict_from_zero_checkpoint",
                    "convert_zero_checkpoint_to_fp32_state_dict",
                    "load_state_dict_from_zero_checkpoint",
                    "main",
                )
            }
        ),
        "utils.groups": Entry(
            names={
                "_get_data_parallel_group": "deepshard.compat.ds_utils:data_parallel_group",
                "_get_data_parallel_world_size": "deepshard.comm:get_world_size",
                "_get_data_parallel_rank": "deepshard.comm:get_rank",
                "_get_sequence_parallel_world_size": "deepshard.compat.ds_utils:no_parallel_world_size",
                "_get_sequence_parallel_rank": "deepshard.compat.ds_utils:no_parallel_rank",
                "_get_expert_parallel_world_size": "deepshard.compat.ds_utils:no_parallel_world_size",
                "_create_expert_and_data_parallel": Refused("expert-parallel process groups (MoE)"),
            }
        ),
        "moe": Entry(),
        "moe.utils": Entry(
            names={
                "is_moe_param": "deepshard.compat.moe_utils:is_moe_param",
                "split_params_into_different_moe_groups_for_optimizer":
                    "deepshard.compat.moe_utils:split_params_into_different_moe_groups_for_optimizer",
                "split_params_grads_into_shared_and_expert_params":
                    "deepshard.compat.moe_utils:split_params_grads_into_shared_and_expert_params",
            }
        ),
        "moe.layer": Refused("the Mixture-of-Experts layer (deepspeed.moe.layer.MoE)"),
        "checkpoint.utils": Entry(
            names={"clone_tensors_for_torch_save": "deepshard.compat.ds_utils:clone_tensors_for_torch_save"}
        ),
        "launcher.runner": Entry(
            names={
                "main": "deepshard.launcher.launch:main",
                "DEEPSPEED_ENVIRONMENT_NAME": "deepshard.compat.ds_utils:DEEPSPEED_ENVIRONMENT_NAME",
            }
        ),
        "module_inject": Refused("kernel injection and AutoTP (deepspeed.module_inject)"),
        "elasticity": Refused("elastic training (removed in DeepSpeed 0.19)"),
        "runtime.comm": Entry(),
        "runtime.comm.coalesced_collectives": Refused("DeepSpeed's coalesced collectives"),
        "ops.sparse_attention.sparsity_config": _SPARSE,
        "runtime.fp16.onebit": _ONEBIT,
    }
)
