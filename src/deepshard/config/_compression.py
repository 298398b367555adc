"""The ``compression_training`` section: DeepSpeed's keys and defaults (``deepspeed/compression/constants.py``).

Each technique has ``shared_parameters`` (switch, method, ``schedule_offset``) and ``different_groups``:
user-named groups, each with ``params`` (bits or ``dense_ratio``), ``modules`` (regular expressions
``re.search``-ed against qualified module names; ``"*"`` selects every compressible module) and, for
row/head/channel pruning, ``related_modules`` (one list of patterns per ``modules`` entry: the layers whose
inputs are the pruned outputs, shrunk by ``redundancy_clean``). A module may join one group per technique.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from deepshard.config._types import Float, Int, StrictModel

QuantType = Literal["symmetric", "asymmetric"]


def _as_list(value: Any) -> Any:
    """DeepSpeed's default ``modules`` is the string ``"*"``; a string means a one-pattern list."""
    return [value] if isinstance(value, str) else value


Patterns = Annotated[list[str], BeforeValidator(_as_list)]


class _Shared(StrictModel):
    enabled: bool = Field(default=False, description="Turn the technique on.")


class _Group(StrictModel):
    modules: Patterns = Field(
        default=["*"],
        description="Patterns (`re.search`) of the modules of this group; `*` is every compressible module.",
    )
    related_modules: list[Patterns] | None = Field(
        default=None,
        description="Per `modules` entry, the patterns of the layers consuming the pruned outputs.",
    )

    @model_validator(mode="after")
    def _pairs(self) -> _Group:
        if self.related_modules is not None and len(self.related_modules) != len(self.modules):
            raise ValueError(
                f"related_modules has {len(self.related_modules)} entries but modules has "
                f"{len(self.modules)}; give one list of related patterns per modules entry"
            )
        return self


class _Technique(StrictModel):
    @model_validator(mode="after")
    def _groups_given(self) -> _Technique:
        shared = getattr(self, "shared_parameters")  # noqa: B009 (every subclass declares it)
        if shared.enabled and not getattr(self, "different_groups"):  # noqa: B009
            raise ValueError("enabled, but different_groups is empty; name at least one group of modules")
        return self


class FP16MixedQuantize(StrictModel):
    """``weight_quantization.shared_parameters.fp16_mixed_quantize``: blend fp and quantized weights."""

    enabled: bool = Field(default=False, description="Blend `ratio * w + (1 - ratio) * q(w)` in the step.")
    quantize_change_ratio: Float = Field(
        default=0.001, ge=0.0, le=1.0, description="How much `ratio` falls (from 1) at each step."
    )


class WeightQuantShared(_Shared):
    """``weight_quantization.shared_parameters``."""

    quantizer_kernel: bool = Field(
        default=False,
        description="DeepSpeed's CUDA quantizer kernel; deepshard's "
        "PyTorch path computes the same grid either way.",
    )
    schedule_offset: Int = Field(default=0, ge=0, description="Step at which weights start being quantized.")
    quantize_groups: Int = Field(default=1, gt=0, description="Groups per weight (its elements, flattened).")
    quantize_verbose: bool = Field(default=False, description="Log every bit-width change.")
    quantization_type: QuantType = Field(default="symmetric", description="`symmetric` or `asymmetric` grid.")
    quantize_weight_in_forward: bool = Field(
        default=False,
        description="`true`: fake-quantize at `target_bits` in the forward (STE); `false`: "
        "quantize the stored weights after each step, `start_bits` down to `target_bits` (MoQ).",
    )
    rounding: Literal["nearest", "stochastic"] = Field(default="nearest", description="Rounding mode.")
    fp16_mixed_quantize: FP16MixedQuantize = Field(default=FP16MixedQuantize(), description="See its keys.")


class WeightQuantParams(StrictModel):
    """``weight_quantization.different_groups.<name>.params``."""

    start_bits: Int = Field(ge=1, description="Bits when quantization starts (required).")
    target_bits: Int = Field(ge=1, description="Final bits (required); 2 is ternary, 1 binary.")
    quantization_period: Int = Field(
        default=1, gt=0, description="Steps before the first 1-bit drop; the period doubles after each drop."
    )

    @model_validator(mode="after")
    def _order(self) -> WeightQuantParams:
        if self.target_bits > self.start_bits:
            raise ValueError(
                f"target_bits={self.target_bits} exceeds start_bits={self.start_bits}; bits only "
                "go down, so set start_bits >= target_bits"
            )
        return self


class WeightQuantGroup(_Group):
    """One weight-quantization group."""

    params: WeightQuantParams = Field(description="Bits of the group.")


class WeightQuantization(_Technique):
    """``weight_quantization``."""

    shared_parameters: WeightQuantShared = Field(default=WeightQuantShared(), description="See its keys.")
    different_groups: dict[str, WeightQuantGroup] = Field(default_factory=dict, description="Named groups.")


class ActivationQuantShared(_Shared):
    """``activation_quantization.shared_parameters``."""

    quantization_type: QuantType = Field(default="symmetric", description="`symmetric` or `asymmetric` grid.")
    range_calibration: Literal["dynamic", "static"] = Field(
        default="dynamic",
        description="`dynamic`: a range per token; `static`: one EMA range (momentum 0.95).",
    )
    schedule_offset: Int = Field(
        default=1000, ge=0, description="Step at which inputs start being quantized."
    )


class ActivationQuantParams(StrictModel):
    """``activation_quantization.different_groups.<name>.params``."""

    bits: Literal[4, 8] = Field(description="Activation bits (required).")


class ActivationQuantGroup(_Group):
    """One activation-quantization group."""

    params: ActivationQuantParams = Field(description="Bits of the group.")


class ActivationQuantization(_Technique):
    """``activation_quantization``."""

    shared_parameters: ActivationQuantShared = Field(
        default=ActivationQuantShared(), description="See its keys."
    )
    different_groups: dict[str, ActivationQuantGroup] = Field(
        default_factory=dict, description="Named groups."
    )


class DenseRatioParams(StrictModel):
    """``<pruning>.different_groups.<name>.params``."""

    dense_ratio: Float = Field(gt=0.0, le=1.0, description="Fraction kept (required).")


class PruningGroup(_Group):
    """One pruning group."""

    params: DenseRatioParams = Field(description="Density of the group.")


class SparsePruningShared(_Shared):
    """``sparse_pruning.shared_parameters``."""

    method: Literal["l1", "topk", "snip_momentum"] = Field(
        default="l1",
        description="Element scores: `l1` magnitude, `topk` learned scores, `snip_momentum` |w*grad|.",
    )
    schedule_offset: Int = Field(default=1000, ge=0, description="Step at which the mask is applied.")
    schedule_offset_end: Int | None = Field(
        default=None,
        ge=0,
        description="snip_momentum: step at which the target density is reached (default `schedule_offset`).",
    )
    schedule_offset_stride: Int = Field(
        default=1, gt=0, description="snip_momentum: steps between mask updates."
    )
    block_pattern: str = Field(
        default="4x1",
        pattern=r"^\d+x\d+$",
        description="snip_momentum: `RxC` blocks of the weight pruned together.",
    )
    dense_ratio: Float = Field(default=0.1, gt=0.0, lt=1.0, description="snip_momentum: final density.")
    excluded_modules: list[str] = Field(default_factory=list, description="snip_momentum: names left dense.")

    @model_validator(mode="after")
    def _window(self) -> SparsePruningShared:
        if self.schedule_offset_end is not None and self.schedule_offset_end < self.schedule_offset:
            raise ValueError(
                f"schedule_offset_end={self.schedule_offset_end} is before schedule_offset="
                f"{self.schedule_offset}; set schedule_offset_end >= schedule_offset"
            )
        return self

    @property
    def end(self) -> int:
        """``schedule_offset_end`` resolved (DeepSpeed's default: ``schedule_offset``)."""
        return self.schedule_offset if self.schedule_offset_end is None else self.schedule_offset_end


class SparsePruning(_Technique):
    """``sparse_pruning``."""

    shared_parameters: SparsePruningShared = Field(default=SparsePruningShared(), description="See its keys.")
    different_groups: dict[str, PruningGroup] = Field(default_factory=dict, description="Named groups.")


class RowPruningShared(_Shared):
    """``row_pruning.shared_parameters``."""

    method: Literal["l1", "topk"] = Field(
        default="l1", description="Row scores: `l1` norm or learned `topk`."
    )
    schedule_offset: Int = Field(default=1000, ge=0, description="Step at which the mask is applied.")


class RowPruning(_Technique):
    """``row_pruning``: output rows of linear layers."""

    shared_parameters: RowPruningShared = Field(default=RowPruningShared(), description="See its keys.")
    different_groups: dict[str, PruningGroup] = Field(default_factory=dict, description="Named groups.")


class HeadPruningShared(_Shared):
    """``head_pruning.shared_parameters``."""

    method: Literal["l1", "topk"] = Field(
        default="topk",
        description="Head scores: learned `topk`, or the `l1` "
        "norm of the head's columns of the output projection.",
    )
    schedule_offset: Int = Field(default=1000, ge=0, description="Step at which the mask is applied.")
    num_heads: Int | None = Field(default=None, gt=0, description="Attention heads (required when enabled).")

    @model_validator(mode="after")
    def _heads(self) -> HeadPruningShared:
        if self.enabled and self.num_heads is None:
            raise ValueError("num_heads must be specified for head pruning")
        return self


class HeadPruning(_Technique):
    """``head_pruning``: heads, masked at the attention output projection's input."""

    shared_parameters: HeadPruningShared = Field(default=HeadPruningShared(), description="See its keys.")
    different_groups: dict[str, PruningGroup] = Field(default_factory=dict, description="Named groups.")


class ChannelPruningShared(_Shared):
    """``channel_pruning.shared_parameters``."""

    method: Literal["l1", "topk"] = Field(default="l1", description="Channel scores: `l1` or learned `topk`.")
    schedule_offset: Int = Field(default=1000, ge=0, description="Step at which the mask is applied.")


class ChannelPruning(_Technique):
    """``channel_pruning``: output channels of Conv2d layers."""

    shared_parameters: ChannelPruningShared = Field(
        default=ChannelPruningShared(), description="See its keys."
    )
    different_groups: dict[str, PruningGroup] = Field(default_factory=dict, description="Named groups.")


class LayerReduction(StrictModel):
    """``layer_reduction``: a shallower student initialised from chosen teacher layers."""

    enabled: bool = Field(default=False, description="Initialise the student from the teacher.")
    keep_number_layer: Int | None = Field(default=None, gt=0, description="Layers of the student.")
    module_name_prefix: str = Field(
        default="", description="Qualified name of the layer list, e.g. `encoder.layer` or `model.layers`."
    )
    teacher_layer: list[Int] = Field(
        default_factory=list, description="Teacher layer copied into student layer i."
    )
    other_module_name: list[str] = Field(
        default_factory=list, description="Modules copied whole (embeddings, heads, final norms)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> LayerReduction:
        if not self.enabled:
            return self
        if not self.module_name_prefix or not self.teacher_layer:
            raise ValueError(
                "enabled, but module_name_prefix or teacher_layer is missing; name the layer list and "
                "the teacher layers to keep"
            )
        if self.keep_number_layer is not None and self.keep_number_layer != len(self.teacher_layer):
            raise ValueError(
                f"keep_number_layer={self.keep_number_layer} but teacher_layer lists "
                f"{len(self.teacher_layer)} layers; they must agree"
            )
        return self


class CompressionConfig(StrictModel):
    """``compression_training``: QAT, pruning and layer reduction (see docs/compression.md)."""

    weight_quantization: WeightQuantization = Field(default=WeightQuantization(), description="See its keys.")
    activation_quantization: ActivationQuantization = Field(
        default=ActivationQuantization(), description="See its keys."
    )
    sparse_pruning: SparsePruning = Field(default=SparsePruning(), description="See its keys.")
    row_pruning: RowPruning = Field(default=RowPruning(), description="See its keys.")
    head_pruning: HeadPruning = Field(default=HeadPruning(), description="See its keys.")
    channel_pruning: ChannelPruning = Field(default=ChannelPruning(), description="See its keys.")
    layer_reduction: LayerReduction = Field(default=LayerReduction(), description="See its keys.")


def load_compression_config(source: Any) -> CompressionConfig:
    """The validated ``compression_training`` section of a DeepSpeed config.

    ``source`` is a dict, a ``ds_config.json`` path, a :class:`~deepshard.config.DeepShardConfig` or a
    :class:`CompressionConfig`. Only ``compression_training`` is read (as DeepSpeed's ``init_compression``),
    so the batch-size keys may be absent. Raises :class:`~deepshard.config.ConfigError` naming the dotted
    path of an unknown key or a bad value.
    """
    from pydantic import ValidationError

    from deepshard.config._schema import DeepShardConfig
    from deepshard.config._source import read_source
    from deepshard.config._walk import convert_validation_error, prepare
    from deepshard.config.errors import ConfigError

    if isinstance(source, CompressionConfig):
        return source
    if isinstance(source, DeepShardConfig):
        return source.compression_training  # type: ignore[no-any-return]
    section = read_source(source).get("compression_training", {})
    if not isinstance(section, dict):
        raise ConfigError(f"'compression_training' must be an object, got {type(section).__name__}.")
    cleaned = prepare(DeepShardConfig, CompressionConfig, section, ("compression_training",))
    try:  # validated under its key, so that error locations carry the full dotted path
        return _Section.model_validate({"compression_training": cleaned}).compression_training
    except ValidationError as exc:
        raise convert_validation_error(exc) from None


class _Section(StrictModel):
    compression_training: CompressionConfig
