"""What deepshard can run today: the one place that gates features still being built.

The schema accepts every value DeepSpeed accepts; these sets decide which of them deepshard can
execute. Widen them in the change that implements the feature (and regenerate docs/config.md).
"""

from __future__ import annotations

from deepshard.config._schema import DeepShardConfig
from deepshard.config.errors import NotSupportedYetError

SUPPORTED_ZERO_STAGES: frozenset[int] = frozenset({0, 1, 2, 3})
"""ZeRO stages deepshard implements (stage 0 is plain data parallelism)."""

SUPPORTED_OFFLOAD_DEVICES: frozenset[str] = frozenset({"none", "cpu", "nvme"})
"""Offload tiers deepshard implements for ``offload_optimizer`` and ``offload_param``."""


# zero_optimization fields that ask for a feature deepshard does not implement unless left at these values
_ZERO_FEATURES_NOT_BUILT: dict[str, tuple[object, str]] = {
    "zero_hpz_partition_size": (1, "ZeRO++ hierarchical partitioning (hpZ)"),
    "zero_quantized_weights": (False, "ZeRO++ quantized weight all-gather"),
    "zero_quantized_nontrainable_weights": (False, "ZeRO++ quantized non-trainable weights"),
    "zero_quantized_gradients": (False, "ZeRO++ quantized gradient reduction"),
    "mics_shard_size": (-1, "MiCS sharding groups"),
    "stage3_use_all_reduce_for_fetch_params": (False, "fetching stage-3 parameters by all-reduce"),
    "stage3_module_granularity_threshold": (0, "DeepSpeed's granularity-based leaf modules (use deepshard.zero.set_unit_modules)"),
}


def check_supported(cfg: DeepShardConfig) -> None:
    """Raise :class:`NotSupportedYetError` naming the key when ``cfg`` asks for a feature not built yet."""
    zero = cfg.zero_optimization
    if zero.stage not in SUPPORTED_ZERO_STAGES:
        raise NotSupportedYetError(
            f"zero_optimization.stage={zero.stage}: deepshard does not support ZeRO stage {zero.stage} yet "
            f"(supported: {sorted(SUPPORTED_ZERO_STAGES)}); set zero_optimization.stage to 0 to continue."
        )
    for key, (default, what) in _ZERO_FEATURES_NOT_BUILT.items():
        value = getattr(zero, key)
        if value != default:
            raise NotSupportedYetError(
                f"zero_optimization.{key}={value!r}: deepshard does not implement {what} yet; remove the key "
                f"or set it to {default!r} to continue."
            )
    offload = zero.offload_optimizer
    if offload is not None and offload.device != "none" and offload.ratio < 1.0:
        raise NotSupportedYetError(
            f"zero_optimization.offload_optimizer.ratio={offload.ratio}: deepshard does not implement partial "
            "optimizer offload (part of the step on the accelerator) yet; set ratio to 1.0 to continue."
        )
    for name, section in (
        ("offload_optimizer", zero.offload_optimizer),
        ("offload_param", zero.offload_param),
    ):
        if section is not None and section.device not in SUPPORTED_OFFLOAD_DEVICES:
            raise NotSupportedYetError(
                f"zero_optimization.{name}.device='{section.device}': deepshard does not support offload to "
                f"'{section.device}' yet (supported: {sorted(SUPPORTED_OFFLOAD_DEVICES)}); set it to 'none' "
                f"or remove zero_optimization.{name} to continue."
            )
