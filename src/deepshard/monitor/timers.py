"""Wall-clock timers of the engine's phases, per optimizer step (``wall_clock_breakdown``).

The phases are DeepSpeed's: ``forward``, ``backward`` (all of it), ``backward_inner`` (autograd, with
the gradient reduction it overlaps), ``backward_allreduce`` (waiting for the gradient reduction after
autograd), and ``step``. Times accumulate over the micro-steps of one accumulation window and are
read and reset at its boundary. On a GPU the times are host times around the calls (no device sync).
"""

from __future__ import annotations

PHASES = ("forward", "backward", "backward_inner", "backward_allreduce", "step")


class StepTimers:
    """Seconds per phase: a running ``total`` (since the last progress report) and the current ``window``."""

    def __init__(self) -> None:
        self.total: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.window: dict[str, float] = dict.fromkeys(PHASES, 0.0)

    def add(self, phase: str, seconds: float) -> None:
        """Account ``seconds`` to ``phase`` (one of :data:`PHASES`)."""
        self.total[phase] += seconds
        self.window[phase] += seconds

    def take_window(self) -> dict[str, float]:
        """The times of the window just finished, in seconds; starts a new window."""
        window, self.window = self.window, dict.fromkeys(PHASES, 0.0)
        return window

    def take_total(self) -> dict[str, float]:
        """The times since the last call, in seconds; starts over."""
        total, self.total = self.total, dict.fromkeys(PHASES, 0.0)
        return total


def format_ms(times: dict[str, float]) -> str:
    """``time (ms) | forward: 1.23 | backward: ...``, DeepSpeed's timer line."""
    return "time (ms) | " + " | ".join(f"{k}: {v * 1000:.2f}" for k, v in times.items())
