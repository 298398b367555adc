"""Monitors (DeepSpeed's ``deepspeed.monitor``): TensorBoard, Weights & Biases, CSV and Comet sinks of
``(name, value, step)`` events, and the engine's per-step :class:`TrainingMonitor`. See docs/observability.md."""

from deepshard.monitor.monitor import Event, Monitor, MonitorMaster
from deepshard.monitor.training import TrainingMonitor

__all__ = ["Event", "Monitor", "MonitorMaster", "TrainingMonitor"]
