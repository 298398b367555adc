"""The ``zero_optimization`` section and its ``offload_optimizer`` / ``offload_param`` sub-sections.

Keys and defaults follow DeepSpeed's ``deepspeed/runtime/zero/config.py`` and ``offload_config.py``.
Every key is accepted at every stage with DeepSpeed's meaning; a key that only matters at another
stage (or with offload) simply has no effect until that stage is in use. Which stages and offload
devices deepshard can run today is decided in :mod:`deepshard.config.support`, not here.
"""

from __future__ import annotations

import sys
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field

from deepshard.config._types import (
    Float,
    Int,
    StrictModel,
    Unsupported,
    empty,
    equals,
    false_or_null,
    integral,
    unsupported,
)

ZeroStage = Annotated[Literal[0, 1, 2, 3], BeforeValidator(integral)]
OffloadDevice = Literal["none", "cpu", "nvme"]

_PIN_MEMORY = (
    "Keep the offloaded copy in page-locked (pinned) host memory for asynchronous, full-bandwidth copies. "
    "DeepSpeed changed this default from `false` to `true`; deepshard follows the current `true`."
)


class OffloadOptimizerConfig(StrictModel):
    """``zero_optimization.offload_optimizer``: where the fp32 master weights and optimizer state live."""

    NOT_SUPPORTED: ClassVar[dict[str, Unsupported]] = {
        "super_offload": unsupported("DeepSpeed's SuperOffload for Superchips (ZeRO-3)", equals(False)),
    }

    device: OffloadDevice = Field(
        default="none",
        description="Tier for optimizer state: `none` (accelerator), `cpu` (host RAM) or `nvme`.",
    )
    nvme_path: str | None = Field(
        default=None, description="Directory on the NVMe device, for `device: nvme`."
    )
    buffer_count: Int = Field(
        default=4,
        ge=0,
        description="Buffers in the NVMe buffer pool; at least the number of states per parameter (4 for Adam).",
    )
    pin_memory: bool = Field(default=True, description=_PIN_MEMORY)
    pipeline_read: bool = Field(
        default=False, description="NVMe: read the next sub-group while the current one steps."
    )
    pipeline_write: bool = Field(
        default=False, description="NVMe: write the previous sub-group while the current one steps."
    )
    fast_init: bool = Field(
        default=False,
        description="NVMe: fast optimizer-state initialisation. Accepted; deepshard always streams the masters to "
        "disk as they are made.",
    )
    ratio: Float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Fraction of the optimizer step that runs on the host (below 1 needs stage 3).",
    )
    convert_grad_on_cpu: bool = Field(
        default=True, description="Convert offloaded gradients to fp32 on the host, not the device."
    )
    cpuadam_cores_perc: Float = Field(
        default=0.8, ge=0.0, le=1.0, description="Fraction of host cores used by the host optimizer step."
    )


class OffloadParamConfig(StrictModel):
    """``zero_optimization.offload_param``: where parameter shards live between uses (stage 3)."""

    device: OffloadDevice = Field(
        default="none",
        description="Tier for parameter shards: `none` (accelerator), `cpu` (host RAM) or `nvme`.",
    )
    nvme_path: str | None = Field(
        default=None, description="Directory on the NVMe device, for `device: nvme`."
    )
    buffer_count: Int = Field(default=5, ge=0, description="Buffers in the NVMe buffer pool for parameters.")
    buffer_size: Int = Field(
        default=100_000_000,
        ge=0,
        description="Elements per NVMe parameter buffer. Accepted; deepshard sizes each buffer to the largest "
        "unit's shard segment (one transfer).",
    )
    max_in_cpu: Int = Field(
        default=1_000_000_000,
        ge=0,
        description="Parameter elements kept in host memory when offloading to NVMe.",
    )
    pin_memory: bool = Field(default=True, description=_PIN_MEMORY)


class AioConfig(StrictModel):
    """``aio``: the NVMe tier's asynchronous IO (DeepSpeed's ``aio`` section and defaults)."""

    ALIASES: ClassVar[dict[str, str]] = {"thread_count": "intra_op_parallelism"}
    NOT_SUPPORTED: ClassVar[dict[str, Unsupported]] = {
        "use_gds": unsupported("GPUDirect Storage (NVMe to GPU without the host)", equals(False)),
    }

    block_size: Int = Field(
        default=1_048_576, gt=0, description="Bytes per IO request; a multiple of 4096 (O_DIRECT's alignment)."
    )
    queue_depth: Int = Field(default=8, gt=0, description="IO requests in flight at once.")
    intra_op_parallelism: Int = Field(
        default=1, gt=0, description="IO threads (`thread_count` is DeepSpeed's older name)."
    )
    single_submit: bool = Field(
        default=False, description="Submit requests one at a time (accepted; deepshard's threads always do)."
    )
    overlap_events: bool = Field(
        default=True, description="Overlap submission and completion (accepted; deepshard's threads always do)."
    )


class ZeroConfig(StrictModel):
    """``zero_optimization``: which model states are sharded across data-parallel ranks, and how."""

    ALIASES: ClassVar[dict[str, str]] = {
        "prefetch_bucket_size": "stage3_prefetch_bucket_size",
        "param_persistence_threshold": "stage3_param_persistence_threshold",
        "model_persistence_threshold": "stage3_model_persistence_threshold",
        "max_live_parameters": "stage3_max_live_parameters",
        "max_reuse_distance": "stage3_max_reuse_distance",
        "gather_16bit_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
        "stage3_gather_fp16_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
        "module_granularity_threshold": "stage3_module_granularity_threshold",
        "use_all_reduce_for_fetch_params": "stage3_use_all_reduce_for_fetch_params",
        "allgather_sequential": "stage3_allgather_sequential",
        "partition_stream_chunk_size": "stage3_partition_stream_chunk_size",
    }
    NOT_SUPPORTED: ClassVar[dict[str, Unsupported]] = {
        "cpu_offload": unsupported(
            'deprecated DeepSpeed switch for optimizer offload; use `offload_optimizer: {"device": "cpu"}`',
            false_or_null(),
        ),
        "cpu_offload_param": unsupported(
            'deprecated DeepSpeed switch for parameter offload; use `offload_param: {"device": "cpu"}`',
            false_or_null(),
        ),
        "cpu_offload_use_pin_memory": unsupported(
            "deprecated DeepSpeed switch; use `pin_memory` inside `offload_optimizer` / `offload_param`",
            false_or_null(),
        ),
        "zenflow": unsupported("ZenFlow asynchronous offloaded optimizer updates", equals(None)),
        "legacy_stage1": unsupported("DeepSpeed's old ZeRO stage 1 implementation", equals(False)),
        "leaf_module": unsupported("modules that ZeRO-3 gathers as one unit", empty()),
    }

    stage: ZeroStage = Field(
        default=0,
        description="0: nothing sharded; 1: optimizer state sharded; 2: optimizer state and gradients; "
        "3: optimizer state, gradients and parameters.",
    )
    contiguous_gradients: bool = Field(
        default=True,
        description="Copy gradients into one contiguous buffer as they are produced (less fragmentation).",
    )
    reduce_scatter: bool = Field(
        default=True, description="Average gradients with reduce-scatter instead of all-reduce."
    )
    reduce_bucket_size: Int = Field(
        default=500_000_000, ge=0, description="Elements reduced per gradient bucket."
    )
    use_multi_rank_bucket_allreduce: bool = Field(
        default=True, description="Combine the reduce buckets of several ranks into one all-reduce."
    )
    allgather_partitions: bool = Field(
        default=True,
        description="Gather updated parameters with all-gather (`true`) or a series of broadcasts (`false`).",
    )
    allgather_bucket_size: Int = Field(
        default=500_000_000, ge=0, description="Elements all-gathered per bucket."
    )
    overlap_comm: bool | None = Field(
        default=None,
        description="Overlap gradient reduction with the backward pass. `null` (the default) means `true` at "
        "stage 3 and `false` otherwise, as in DeepSpeed; read `effective_overlap_comm` for the value in force.",
    )
    host_shared_memory: bool = Field(
        default=True,
        description="deepshard extension: when every data-parallel rank runs on one host over gloo, keep the "
        "parameters (stages 1-3) and stage-1 gradients in one shared-memory mapping instead of exchanging them "
        "with collectives. The environment variable `DEEPSHARD_HOST_SHM` (`0` or `1`), when set, overrides it. "
        "See docs/zero.md.",
    )
    load_from_fp32_weights: bool = Field(
        default=True,
        description="Initialise fp32 master weights from the checkpoint's fp32 copy rather than the 16-bit model.",
    )
    elastic_checkpoint: bool = Field(
        default=False, description="Legacy elastic checkpoint support (deprecated in DeepSpeed)."
    )
    offload_optimizer: OffloadOptimizerConfig | None = Field(
        default=None, description="Offload optimizer state and its step to the host or NVMe (stages 1-3)."
    )
    offload_param: OffloadParamConfig | None = Field(
        default=None, description="Offload parameter shards to the host or NVMe (stage 3)."
    )
    sub_group_size: Int = Field(
        default=1_000_000_000,
        ge=0,
        description="Elements per optimizer-step tile (ZeRO-3 offload / ZeRO-Infinity).",
    )
    stage3_prefetch_bucket_size: Int = Field(
        default=50_000_000, ge=0, description="Stage 3: elements prefetched ahead of use."
    )
    stage3_param_persistence_threshold: Int = Field(
        default=100_000, ge=0, description="Stage 3: parameters smaller than this stay unsharded."
    )
    stage3_model_persistence_threshold: Int = Field(
        default=sys.maxsize,
        ge=0,
        description="Stage 3: cap on the total elements kept unsharded by the persistence threshold.",
    )
    stage3_max_live_parameters: Int = Field(
        default=1_000_000_000, ge=0, description="Stage 3: elements resident per rank before releasing."
    )
    stage3_max_reuse_distance: Int = Field(
        default=1_000_000_000,
        ge=0,
        description="Stage 3: keep a parameter if it is reused within this many elements.",
    )
    stage3_gather_16bit_weights_on_model_save: bool = Field(
        default=False,
        description="Stage 3: gather the 16-bit weights when saving the model "
        "(`stage3_gather_fp16_weights_on_model_save` is DeepSpeed's deprecated name).",
    )
    stage3_module_granularity_threshold: Int = Field(
        default=0, ge=0, description="Stage 3: modules below this granularity are fetched as one unit."
    )
    stage3_use_all_reduce_for_fetch_params: bool = Field(
        default=False, description="Stage 3: fetch parameters with all-reduce."
    )
    stage3_allgather_sequential: bool = Field(
        default=False, description="Stage 3: gather parameters one by one, without bucketing."
    )
    stage3_partition_stream_chunk_size: Int = Field(
        default=0,
        ge=0,
        description="Stage 3: partition parameters larger than this through chunks of this size at init; `0` disables.",
    )
    ignore_unused_parameters: bool = Field(
        default=True, description="Tolerate parameters that receive no gradient (stage 2)."
    )
    round_robin_gradients: bool = Field(
        default=False, description="Stages 1-2 with offload: spread gradient copies to the host across ranks."
    )
    compute_grad_norm: bool = Field(
        default=True, description="Stages 1-2: compute and keep the global gradient norm."
    )
    parameter_alignment: bool = Field(
        default=False, description="Stages 1-2: pad flat buffers so every parameter starts 16-byte aligned."
    )
    zero_hpz_partition_size: Int = Field(
        default=1,
        ge=0,
        description="ZeRO++ hpZ: ranks in the secondary parameter partition group; 1 disables hpZ.",
    )
    zero_quantized_weights: bool = Field(
        default=False, description="ZeRO++: quantize weights for all-gather."
    )
    zero_quantized_nontrainable_weights: bool = Field(
        default=False, description="ZeRO++: store non-trainable weights quantized."
    )
    zero_quantized_gradients: bool = Field(
        default=False, description="ZeRO++: quantize gradients for reduction."
    )
    zeropp_loco_param: dict[str, Any] | None = Field(
        default=None, description="ZeRO++ LoCo parameters (`err_beta`, `reset_T`) for quantized gradients."
    )
    mics_shard_size: Int = Field(default=-1, description="MiCS: ranks per shard group; `-1` disables MiCS.")
    mics_hierarchical_params_gather: bool = Field(
        default=False, description="MiCS: hierarchical parameter all-gather."
    )
    memory_efficient_linear: bool = Field(default=True, description="Stage 3: memory-efficient linear layer.")
    pipeline_loading_checkpoint: bool = Field(
        default=False, description="Stage 3: load checkpoints in pipeline mode."
    )
    override_module_apply: bool = Field(
        default=True, description="Stage 3: gather parameters around `nn.Module.apply`."
    )
    log_trace_cache_warnings: bool = Field(
        default=False, description="Stage 3: log parameter trace-cache warnings."
    )
    enable_sanity_checks: bool = Field(default=False, description="Run internal sanity checks (debugging).")
    save_muon_momentum_buffer_in_memory: bool = Field(
        default=False, description="Stage 3 with NVMe: keep the Muon momentum buffer in memory."
    )

    @property
    def effective_overlap_comm(self) -> bool:
        """``overlap_comm`` as DeepSpeed applies it: the given value, else ``True`` only at stage 3."""
        return self.stage == 3 if self.overlap_comm is None else self.overlap_comm
