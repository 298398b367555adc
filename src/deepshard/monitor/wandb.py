"""Weights & Biases monitor: ``wandb.init(project, group, entity=team)`` then ``wandb.log`` per event."""

from __future__ import annotations

from collections.abc import Sequence

from deepshard.config._observability import WandbConfig
from deepshard.monitor._optional import require
from deepshard.monitor.monitor import Event, Monitor


class WandbMonitor(Monitor):
    """Logs each event as ``wandb.log({name: value}, step=step)``, as DeepSpeed does."""

    def __init__(self, config: WandbConfig) -> None:
        self._wandb = require("wandb", "wandb", "wandb")
        self._wandb.init(project=config.project, group=config.group, entity=config.team)

    @staticmethod
    def check_available() -> None:
        """Raise a clear ImportError when the `wandb` package is missing."""
        require("wandb", "wandb", "wandb")

    def write_events(self, event_list: Sequence[Event]) -> None:
        """One ``wandb.log`` call per event."""
        for name, value, step in event_list:
            self._wandb.log({name: value}, step=step)

    def close(self) -> None:
        """Finish the run."""
        finish = getattr(self._wandb, "finish", None)
        if finish is not None:
            finish()
