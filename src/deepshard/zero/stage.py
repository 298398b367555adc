"""ZeRO stages as data: which model states are sharded across the data-parallel ranks.

| stage | optimizer state + fp32 master | gradients | parameters |
|-------|-------------------------------|-----------|------------|
| 0     | whole                         | whole     | whole      |
| 1     | sharded                       | whole     | whole      |
| 2     | sharded                       | sharded   | whole      |
| 3     | sharded                       | sharded   | sharded    |

Model-state bytes per rank with mixed precision and Adam (Ψ parameters, N ranks):
stage 0 16Ψ, stage 1 4Ψ + 12Ψ/N, stage 2 2Ψ + 14Ψ/N, stage 3 16Ψ/N.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ZeroStage:
    """What one ZeRO stage shards."""

    stage: int
    shard_optimizer: bool
    shard_gradients: bool
    shard_parameters: bool

    @classmethod
    def from_int(cls, stage: int) -> ZeroStage:
        """The stage for DeepSpeed's ``zero_optimization.stage`` value."""
        if stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage}")
        return cls(
            stage=stage, shard_optimizer=stage >= 1, shard_gradients=stage >= 2, shard_parameters=stage >= 3
        )

    def model_state_bytes(self, num_params: int, world: int, mixed_precision: bool = True) -> float:
        """The ZeRO paper's model-state bytes per rank with Adam (16 bytes/param mixed, 16 fp32 minus masters)."""
        param_b, grad_b = (2, 2) if mixed_precision else (4, 4)
        opt_b = 12 if mixed_precision else 8  # fp32 master + two moments; fp32 runs step the params
        p = param_b * num_params / (world if self.shard_parameters else 1)
        g = grad_b * num_params / (world if self.shard_gradients else 1)
        o = opt_b * num_params / (world if self.shard_optimizer else 1)
        return p + g + o
