"""The engine's side of an autotuning experiment: time a window of steps, write the metrics, stop.

The tuner starts each experiment with ``DEEPSHARD_AUTOTUNING_METRIC_PATH`` set. The engine then times
optimizer steps ``start_profile_step`` (exclusive) to ``end_profile_step`` (inclusive), rank 0 writes
``{"throughput": samples/s, "latency": s/step, ...}`` there, and the process exits after
``end_profile_step``, as DeepSpeed's engine does in an autotuning experiment. Without the variable
nothing happens.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from deepshard import comm
from deepshard.config import DeepShardConfig

METRIC_PATH_ENV = "DEEPSHARD_AUTOTUNING_METRIC_PATH"


class ExperimentRecorder:
    """Times the window of one experiment (see the module doc)."""

    def __init__(self, path: str, start_step: int, end_step: int) -> None:
        if end_step <= start_step:
            raise ValueError(
                f"autotuning.end_profile_step ({end_step}) must be larger than start_profile_step ({start_step})"
            )
        self.path, self.start_step, self.end_step = path, start_step, end_step
        self._start: float | None = None

    @classmethod
    def from_env(cls, config: DeepShardConfig) -> ExperimentRecorder | None:
        """A recorder when the tuner started this process, else ``None``."""
        path = os.environ.get(METRIC_PATH_ENV)
        if not path:
            return None
        return cls(path, config.autotuning.start_profile_step, config.autotuning.end_profile_step)

    def on_step(self, engine: Any) -> None:
        """After an optimizer step: start or end the timed window; after its end, write and exit."""
        if engine.global_steps == self.start_step:
            comm.barrier()
            self._start = time.perf_counter()
        if engine.global_steps != self.end_step or self._start is None:
            return
        comm.barrier()
        elapsed = time.perf_counter() - self._start
        steps = self.end_step - self.start_step
        metrics = {
            "throughput": steps * engine.train_batch_size() / elapsed,
            "latency": elapsed / steps,
            "train_micro_batch_size_per_gpu": engine.train_micro_batch_size_per_gpu(),
            "zero_stage": engine.zero_optimization_stage(),
            "world_size": engine.dp_world_size,
        }
        if comm.get_rank() == 0:
            with open(self.path, "w") as handle:
                json.dump(metrics, handle)
        comm.barrier()
        sys.exit(0)  # DeepSpeed's rule: an autotuning experiment ends after end_profile_step
