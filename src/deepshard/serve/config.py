"""The serving engine's configuration: DeepSpeed FastGen's state-manager keys where they exist.

``max_ragged_batch_size`` (tokens per forward, 768), ``max_ragged_sequence_count`` (sequences per
forward, 512), ``max_tracked_sequences`` (2048) and ``max_context`` (8192) keep DeepSpeed-MII's names
and defaults. The paged-cache keys are deepshard's own: ``block_size`` (16 positions, vLLM's default)
and ``num_kv_blocks`` (the pool; KV memory is ``2 * layers * kv_heads * head_dim * block_size *
num_kv_blocks`` elements). ``max_tracked_sequences`` bounds the requests in flight (the HTTP server answers 429
past it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError, model_validator

from deepshard.config._types import DType, Int, StrictModel
from deepshard.config._walk import convert_validation_error, prepare


class ServeConfig(StrictModel):
    """Validated, frozen serving configuration (see the module docstring)."""

    max_ragged_batch_size: Int = 768
    max_ragged_sequence_count: Int = 512
    max_tracked_sequences: Int = 2048
    max_context: Int = 8192
    block_size: Int = 16
    num_kv_blocks: Int = 2048
    enable_prefix_caching: bool = True
    dtype: DType = "fp32"

    @model_validator(mode="after")
    def _check(self) -> ServeConfig:
        for name in (
            "max_ragged_batch_size",
            "max_ragged_sequence_count",
            "max_tracked_sequences",
            "max_context",
            "block_size",
            "num_kv_blocks",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_ragged_sequence_count > self.max_ragged_batch_size:
            raise ValueError(
                f"max_ragged_sequence_count={self.max_ragged_sequence_count} exceeds max_ragged_batch_size="
                f"{self.max_ragged_batch_size}: every running sequence needs one token of the budget per pass; "
                "lower the first or raise the second."
            )
        return self


def load_serve_config(config: ServeConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> ServeConfig:
    """A :class:`ServeConfig` from a dict and/or keyword arguments (keywords win).

    Raises ``ConfigError`` naming the key for an unknown key or a bad value.
    """
    if isinstance(config, ServeConfig):
        if not kwargs:
            return config
        config = config.model_dump()
    data = {**(dict(config) if config else {}), **kwargs}
    try:
        return ServeConfig.model_validate(prepare(ServeConfig, ServeConfig, data))
    except ValidationError as exc:
        raise convert_validation_error(exc) from None
