"""TensorBoard monitor: scalars through ``torch.utils.tensorboard.SummaryWriter`` in ``output_path/job_name``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from deepshard.config._observability import TensorBoardConfig
from deepshard.monitor._optional import require
from deepshard.monitor.monitor import Event, Monitor


class TensorBoardMonitor(Monitor):
    """Writes each event with ``add_scalar(name, value, step)`` and flushes after each batch of events."""

    def __init__(self, config: TensorBoardConfig) -> None:
        self.check_available()
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = os.path.join(config.output_path, config.job_name)
        os.makedirs(self.log_dir, exist_ok=True)
        self.summary_writer: Any = SummaryWriter(log_dir=self.log_dir)

    @staticmethod
    def check_available() -> None:
        """Raise a clear ImportError when the `tensorboard` package is missing."""
        require("tensorboard", "tensorboard", "tensorboard")

    def write_events(self, event_list: Sequence[Event]) -> None:
        """``add_scalar`` each event, then flush."""
        for name, value, step in event_list:
            self.summary_writer.add_scalar(name, value, step)
        self.summary_writer.flush()

    def close(self) -> None:
        """Close the event file."""
        self.summary_writer.close()
