"""CSV monitor: one file per metric under ``output_path/job_name/``, DeepSpeed's layout.

``Train/Samples/lr`` goes to ``Train_Samples_lr.csv`` with the header ``step,lr`` (the last ``/``
component) written when the monitor first creates the file, then one ``step,value`` row per event.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence

from deepshard.config._observability import CSVConfig
from deepshard.monitor.monitor import Event, Monitor


def csv_file_name(metric: str) -> str:
    """The file name DeepSpeed gives ``metric``: ``/`` and spaces become ``_``, plus ``.csv``."""
    return metric.replace("/", "_").replace(" ", "_") + ".csv"


class csvMonitor(Monitor):  # noqa: N801 - DeepSpeed's class name
    """Appends events to CSV files (rank 0 builds it; see :class:`~deepshard.monitor.MonitorMaster`)."""

    def __init__(self, config: CSVConfig) -> None:
        self.log_dir = os.path.join(config.output_path, config.job_name)
        os.makedirs(self.log_dir, exist_ok=True)
        self._started: set[str] = set()

    @staticmethod
    def check_available() -> None:
        """The CSV monitor needs nothing beyond the standard library."""

    def write_events(self, event_list: Sequence[Event]) -> None:
        """Append one ``step,value`` row per event to its metric's file."""
        for name, value, step in event_list:
            filename = csv_file_name(name)
            with open(os.path.join(self.log_dir, filename), "a", newline="") as handle:
                writer = csv.writer(handle)
                if filename not in self._started:
                    self._started.add(filename)
                    writer.writerow(["step", name.rsplit("/", 1)[-1]])
                writer.writerow([step, value])
