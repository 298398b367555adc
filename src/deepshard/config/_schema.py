"""The top of the config tree: :class:`DeepShardConfig`, plus the ``optimizer`` and ``scheduler`` sections.

Build it with :func:`deepshard.config.load_config`, which reads DeepSpeed's JSON, applies aliases,
refuses unknown and not-yet-supported keys, and resolves the batch-size triad for the data-parallel
world size. The model validates types and values; cross-field rules live in the loader.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Any, ClassVar

from pydantic import BeforeValidator, Field, PrivateAttr

from deepshard.config._compression import CompressionConfig
from deepshard.config._observability import (
    AutotuningConfig,
    CometConfig,
    CommsLoggerConfig,
    CSVConfig,
    FlopsProfilerConfig,
    TensorBoardConfig,
    WandbConfig,
)
from deepshard.config._precision import BF16Config, DataTypesConfig, FP16Config
from deepshard.config._types import (
    DType,
    Float,
    Int,
    StrictModel,
    Unsupported,
    all_defaults,
    equals,
    unsupported,
)
from deepshard.config._unsupported import TOP_LEVEL_NOT_SUPPORTED
from deepshard.config._zero import AioConfig, ZeroConfig


def _infinity_is_never(value: Any) -> Any:
    """``float("inf")`` (Hugging Face accelerate's way to turn the progress report off) reads as ``null``."""
    return None if isinstance(value, float) and value == math.inf else value


class OptimizerConfig(StrictModel):
    """``optimizer``: the optimizer the engine builds when the script passes none."""

    NOT_SUPPORTED: ClassVar[dict[str, Unsupported]] = {
        "legacy_fusion": unsupported("DeepSpeed's legacy fused fp16 optimizer", equals(False)),
    }

    type: str = Field(description="Optimizer name, e.g. `Adam`, `AdamW`, `SGD` (matched case-insensitively).")
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the optimizer's constructor; validated by the optimizer builder.",
    )


class SchedulerConfig(StrictModel):
    """``scheduler``: the learning-rate schedule the engine builds when the script passes none."""

    type: str = Field(
        description="Scheduler name, e.g. `WarmupLR`, `WarmupDecayLR`, `OneCycle`, `LRRangeTest`."
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="Keyword arguments of the scheduler; validated by the scheduler builder.",
    )


class CheckpointConfig(StrictModel):
    """``checkpoint``: how ``save_checkpoint`` writes. DeepSpeed's keys are accepted at their defaults only."""

    NOT_SUPPORTED: ClassVar[dict[str, Unsupported]] = {
        "tag_validation": unsupported("checks that every rank saves under the same tag", equals("Warn")),
        "load_universal": unsupported("loads a DeepSpeed universal checkpoint", equals(False)),
        "use_node_local_storage": unsupported("saves to storage local to each node", equals(False)),
        "checkpoint_serialization": unsupported("torch.save's serialization of the checkpoint files", equals(True)),
        "writer": unsupported("DeepSpeed's checkpoint writer engine (mock/python/fast)", equals(None)),
        "parallel_write": unsupported(
            "pipeline stages writing in parallel", all_defaults({"pipeline_stage": False})
        ),
    }

    async_save: bool = Field(
        default=False,
        description="deepshard extension: `save_checkpoint` copies the state to host memory and returns while a "
        "background thread writes it (costs one host copy of the model and optimizer state during the write); "
        "`save_checkpoint(async_save=...)` overrides it per call. See docs/checkpoints.md.",
    )


class DeepShardConfig(StrictModel):
    """A validated, immutable DeepSpeed-compatible configuration with the batch-size triad resolved."""

    ALIASES: ClassVar[dict[str, str]] = {"bfloat16": "bf16"}
    NOT_SUPPORTED: ClassVar[dict[str, Unsupported]] = TOP_LEVEL_NOT_SUPPORTED

    train_batch_size: Int = Field(
        gt=0,
        description="Samples per optimizer step across all data-parallel ranks: "
        "`train_micro_batch_size_per_gpu * gradient_accumulation_steps * dp_world_size`. "
        "Derived when omitted (see *Batch size*).",
    )
    train_micro_batch_size_per_gpu: Int = Field(
        gt=0, description="Samples per rank per forward/backward. Derived when omitted (see *Batch size*)."
    )
    gradient_accumulation_steps: Int = Field(
        gt=0,
        description="Micro-batches accumulated per optimizer step. Derived when omitted; `1` when only one "
        "of the other two is given.",
    )
    steps_per_print: Annotated[Int | None, BeforeValidator(_infinity_is_never)] = Field(
        default=None,
        gt=0,
        description="Log a progress report every N optimizer steps; `null` turns the report off (so does "
        "infinity, which accelerate writes). DeepSpeed's source now defaults to `null` (older releases, and "
        "its docs, say `10`); deepshard follows the source.",
    )
    wall_clock_breakdown: bool = Field(
        default=False,
        description="Time the forward, backward (inner and gradient-reduction parts) and step phases of each "
        "optimizer step; logged on rank 0 and written to the enabled monitors.",
    )
    memory_breakdown: bool = Field(default=False, description="Log memory use at each phase.")
    gradient_clipping: Float = Field(
        default=1.0,
        ge=0.0,
        description="Clip the global gradient norm to this value; `0` turns clipping off. DeepSpeed changed this "
        "default from `0.0` (off) to `1.0` (deepspeedai/DeepSpeed#8068); deepshard follows the current `1.0`. "
        "Set `0.0` explicitly to train unclipped.",
    )
    prescale_gradients: bool = Field(
        default=False,
        description="Divide gradients by the data-parallel world size before all-reduce instead of after.",
    )
    gradient_predivide_factor: Float = Field(
        default=1.0,
        gt=0.0,
        description="Divide gradients by this factor before all-reduce and by the rest after.",
    )
    communication_data_type: DType | None = Field(
        default=None,
        description="Dtype of gradient communication; `null` uses the training dtype. Accepts DeepSpeed's "
        "spellings case-insensitively, normalised to `fp32`, `fp16` or `bf16`.",
    )
    dataloader_drop_last: bool = Field(
        default=False, description="Drop the last incomplete batch of the engine's data loader."
    )
    zero_allow_untested_optimizer: bool = Field(
        default=False, description="Allow ZeRO (stage >= 1) with an optimizer DeepSpeed has not tested."
    )
    zero_force_ds_cpu_optimizer: bool = Field(
        default=True,
        description="DeepSpeed: with optimizer offload, require its CPU optimizer. Accepted; deepshard offloads any "
        "`torch.optim` optimizer (Adam/AdamW run PyTorch's fused CPU kernel).",
    )
    optimizer: OptimizerConfig | None = Field(
        default=None, description="Optimizer built by the engine; see `optimizer`."
    )
    scheduler: SchedulerConfig | None = Field(
        default=None, description="Learning-rate scheduler; see `scheduler`."
    )
    fp16: FP16Config = Field(default=FP16Config(), description="fp16 mixed precision; see `fp16`.")
    bf16: BF16Config = Field(default=BF16Config(), description="bf16 mixed precision; see `bf16`.")
    data_types: DataTypesConfig = Field(
        default=DataTypesConfig(), description="Buffer dtypes; see `data_types`."
    )
    zero_optimization: ZeroConfig = Field(
        default=ZeroConfig(), description="ZeRO sharding; see `zero_optimization`."
    )
    checkpoint: CheckpointConfig = Field(
        default=CheckpointConfig(), description="Checkpoint writing; see `checkpoint`."
    )
    aio: AioConfig = Field(default=AioConfig(), description="Asynchronous IO of the NVMe tier; see `aio`.")
    tensorboard: TensorBoardConfig = Field(
        default=TensorBoardConfig(), description="TensorBoard monitor; see `tensorboard` and docs/observability.md."
    )
    wandb: WandbConfig = Field(default=WandbConfig(), description="Weights & Biases monitor; see `wandb`.")
    csv_monitor: CSVConfig = Field(default=CSVConfig(), description="CSV monitor; see `csv_monitor`.")
    comet: CometConfig = Field(default=CometConfig(), description="Comet monitor; see `comet`.")
    flops_profiler: FlopsProfilerConfig = Field(
        default=FlopsProfilerConfig(), description="The flops profiler; see `flops_profiler`."
    )
    comms_logger: CommsLoggerConfig = Field(
        default=CommsLoggerConfig(), description="The communication logger; see `comms_logger`."
    )
    autotuning: AutotuningConfig = Field(
        default=AutotuningConfig(), description="The autotuner's search; see `autotuning` and docs/observability.md."
    )
    compression_training: CompressionConfig = Field(
        default=CompressionConfig(), description="QAT, pruning, layer reduction; see docs/compression.md."
    )

    _raw: Mapping[str, Any] = PrivateAttr(default_factory=lambda: MappingProxyType({}))
    _dp_world_size: int = PrivateAttr(default=1)

    @property
    def raw(self) -> Mapping[str, Any]:
        """The user's config as given (before aliases and defaults), read-only; lists become tuples."""
        return self._raw

    def get(self, key: str, default: Any = None) -> Any:
        """``key`` of the config as given (:attr:`raw`): DeepSpeed's ``engine.config`` is that dict, and the
        Hugging Face stack reads it so (``engine.config.get("zero_optimization", {})``)."""
        return self._raw.get(key, default)

    @property
    def dp_world_size(self) -> int:
        """The data-parallel world size the batch-size triad was resolved for."""
        return self._dp_world_size
