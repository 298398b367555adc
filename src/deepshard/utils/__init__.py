"""Small helpers shared across deepshard (logging, timers)."""

from deepshard.utils.logging import log_dist, logger

__all__ = ["log_dist", "logger"]
