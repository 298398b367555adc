"""Comet monitor: ``comet_ml.start(...)`` then ``log_metric`` per event, thinned by ``samples_log_interval``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deepshard.config._observability import CometConfig
from deepshard.monitor._optional import require
from deepshard.monitor.monitor import Event, Monitor


class CometMonitor(Monitor):
    """Logs a metric at its first event, then again only once ``samples_log_interval`` more samples passed."""

    def __init__(self, config: CometConfig) -> None:
        comet_ml = require("comet_ml", "comet", "comet")
        self.experiment: Any = comet_ml.start(
            api_key=config.api_key,
            project=config.project,
            workspace=config.workspace,
            experiment_key=config.experiment_key,
            mode=config.mode,
            online=config.online,
        )
        if config.experiment_name is not None:
            self.experiment.set_name(config.experiment_name)
        self.samples_log_interval = config.samples_log_interval
        self._last_logged: dict[str, int] = {}

    @staticmethod
    def check_available() -> None:
        """Raise a clear ImportError when the `comet_ml` package is missing."""
        require("comet_ml", "comet", "comet")

    def _due(self, name: str, step: int) -> bool:
        last = self._last_logged.get(name)
        if last is None or step - last >= self.samples_log_interval:
            self._last_logged[name] = step
            return True
        return False

    def write_events(self, event_list: Sequence[Event]) -> None:
        """``log_metric(name, value, step=step)`` for each event that is due."""
        for name, value, step in event_list:
            if self._due(name, step):
                self.experiment.log_metric(name, value, step=step)

    def close(self) -> None:
        """End the experiment."""
        end = getattr(self.experiment, "end", None)
        if end is not None:
            end()
