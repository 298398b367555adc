"""The monitor interface and :class:`MonitorMaster`, which fans events out to the enabled monitors.

An event is DeepSpeed's tuple ``(name, value, step)``: a ``/``-separated metric name such as
``Train/Samples/lr``, a number, and the step it belongs to (DeepSpeed's engine uses the global sample
count). Only global rank 0 writes; on other ranks every monitor is absent and ``write_events`` does nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from deepshard import comm
from deepshard.config import DeepShardConfig

Event = tuple[str, float, int]


class Monitor(ABC):
    """A sink of events (DeepSpeed's ``deepspeed.monitor.monitor.Monitor``)."""

    @abstractmethod
    def write_events(self, event_list: Sequence[Event]) -> None:
        """Record each ``(name, value, step)``."""

    def close(self) -> None:  # noqa: B027 - most sinks have nothing to release
        """Flush and release what the monitor holds."""


class MonitorMaster(Monitor):
    """The monitors a config enables (TensorBoard, W&B, CSV, Comet), on global rank 0 only.

    ``enabled`` is true on every rank when any monitor is enabled (so that all ranks take part in
    gathering the per-rank figures); the sinks themselves exist only on rank 0.
    """

    def __init__(self, config: DeepShardConfig) -> None:
        from deepshard.monitor.comet import CometMonitor
        from deepshard.monitor.csv_monitor import csvMonitor
        from deepshard.monitor.tensorboard import TensorBoardMonitor
        from deepshard.monitor.wandb import WandbMonitor

        self.enabled = any(
            s.enabled for s in (config.tensorboard, config.wandb, config.csv_monitor, config.comet)
        )
        self.monitors: list[Monitor] = []
        writer = comm.get_rank() == 0
        # availability is checked on every rank; only rank 0 opens files and sessions
        if config.tensorboard.enabled:
            self._add(TensorBoardMonitor, config.tensorboard, writer)
        if config.wandb.enabled:
            self._add(WandbMonitor, config.wandb, writer)
        if config.csv_monitor.enabled:
            self._add(csvMonitor, config.csv_monitor, writer)
        if config.comet.enabled:
            self._add(CometMonitor, config.comet, writer)

    def _add(self, cls: Any, section: Any, writer: bool) -> None:
        cls.check_available()
        if writer:
            self.monitors.append(cls(section))

    def write_events(self, event_list: Sequence[Event]) -> None:
        """Send the events to every enabled monitor (nothing off rank 0)."""
        for monitor in self.monitors:
            monitor.write_events(event_list)

    def close(self) -> None:
        """Close every monitor."""
        for monitor in self.monitors:
            monitor.close()
