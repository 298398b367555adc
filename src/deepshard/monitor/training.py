"""What the engine reports at each optimizer step: :class:`TrainingMonitor`.

The engine calls :meth:`~TrainingMonitor.on_forward`, :meth:`~TrainingMonitor.on_backward` and, at an
accumulation boundary, :meth:`~TrainingMonitor.on_step`. With a monitor enabled, ``on_step`` gathers a
few numbers from every data-parallel rank (one ``all_gather`` of 5 floats: loss sum, loss count, tokens,
current and peak memory) and global rank 0 writes these events, all at step = global samples:

| event | value |
|---|---|
| ``Train/Samples/train_loss`` | mean of the losses given to ``backward`` in the window, over all ranks |
| ``Train/Samples/lr`` | learning rate of the first parameter group |
| ``Train/Samples/loss_scale`` | the loss scale (fp16 only, as in DeepSpeed) |
| ``Train/Samples/grad_norm`` | global norm of the unscaled gradients before clipping |
| ``Train/Samples/samples_per_sec`` | ``train_batch_size`` / wall time of the window |
| ``Train/Samples/tokens_per_sec`` | tokens of all ranks / wall time (when the first input is a token tensor) |
| ``Train/Samples/memory_MiB_rank{r}``, ``peak_memory_MiB_rank{r}`` | per rank: RSS (CPU) or allocated (CUDA) |
| ``Train/Samples/elapsed_time_ms_{phase}`` | with ``wall_clock_breakdown``: the phases of :mod:`deepshard.monitor.timers` |

With every monitor disabled nothing is gathered, computed or written (the timers still run, as before).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from deepshard import comm
from deepshard.config import DeepShardConfig
from deepshard.monitor.memory import current_and_peak_bytes
from deepshard.monitor.monitor import Event, MonitorMaster
from deepshard.monitor.timers import StepTimers, format_ms
from deepshard.utils.logging import log_dist

_MIB = 2**20


def count_tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Tokens in a forward's inputs: the elements of the first integer tensor of rank >= 2 (``(batch, seq)``
    ids) among the positional arguments, else of ``input_ids``; 0 when there is none."""
    candidates = [*args, kwargs.get("input_ids")]
    for value in candidates:
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and not value.is_floating_point():
            return value.numel()
    return 0


class TrainingMonitor:
    """Per-step statistics of one engine, written to the monitors of the config (see the module doc)."""

    def __init__(self, config: DeepShardConfig, device: torch.device, group: Any = None) -> None:
        self.master = MonitorMaster(config)
        self.timers = StepTimers()
        self.wall_clock_breakdown = config.wall_clock_breakdown
        self.fp16 = config.fp16.enabled
        self.device = device
        self.group = group
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self._loss_count = 0
        self._tokens = 0
        self._window_start: float | None = None

    @property
    def enabled(self) -> bool:
        """Whether any monitor is enabled (the same on every rank)."""
        return self.master.enabled

    def on_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Count the tokens of a forward; the first forward of a window starts its clock."""
        if not self.enabled:
            return
        if self._window_start is None:
            self._window_start = time.perf_counter()
        self._tokens += count_tokens(args, kwargs)

    def on_backward(self, loss: torch.Tensor) -> None:
        """Add ``loss`` (as the script computed it, before accumulation scaling) to the window's mean."""
        if not self.enabled:
            return
        self._loss_sum += loss.detach().to(self._loss_sum.dtype).reshape(())
        self._loss_count += 1

    def on_step(self, engine: Any) -> None:
        """At an accumulation boundary, after the optimizer step: log the timers and write the events."""
        window = self.timers.take_window()
        if self.wall_clock_breakdown:
            log_dist(format_ms(window), ranks=[0], level=logging.INFO)
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self._window_start if self._window_start is not None else 0.0
        mine = torch.tensor(
            [self._loss_sum.item(), self._loss_count, self._tokens, *current_and_peak_bytes(self.device)],
            dtype=torch.float64,
            device=self.device,
        )
        ranks = [torch.zeros_like(mine) for _ in range(comm.get_world_size(self.group))]
        comm.all_gather(ranks, mine, group=self.group)
        self._loss_sum.zero_()
        self._loss_count = 0
        self._tokens = 0
        self._window_start = None
        if comm.get_rank() == 0:
            self.master.write_events(self._events(engine, torch.stack(ranks).cpu(), elapsed, window))

    def _events(
        self, engine: Any, ranks: torch.Tensor, elapsed: float, window: dict[str, float]
    ) -> list[Event]:
        step = int(engine.global_samples)
        events: list[Event] = []
        count = float(ranks[:, 1].sum())
        if count > 0:
            events.append(("Train/Samples/train_loss", float(ranks[:, 0].sum()) / count, step))
        lrs = engine.get_lr()
        if lrs:
            events.append(("Train/Samples/lr", lrs[0], step))
        if self.fp16:
            events.append(("Train/Samples/loss_scale", float(engine.get_loss_scale()), step))
        norm = engine.get_global_grad_norm()
        if norm is not None:
            events.append(("Train/Samples/grad_norm", float(norm), step))
        if elapsed > 0:
            events.append(("Train/Samples/samples_per_sec", engine.train_batch_size() / elapsed, step))
            tokens = float(ranks[:, 2].sum())
            if tokens > 0:
                events.append(("Train/Samples/tokens_per_sec", tokens / elapsed, step))
        for rank, row in enumerate(ranks.tolist()):
            events.append((f"Train/Samples/memory_MiB_rank{rank}", row[3] / _MIB, step))
            events.append((f"Train/Samples/peak_memory_MiB_rank{rank}", row[4] / _MIB, step))
        if self.wall_clock_breakdown:
            events += [(f"Train/Samples/elapsed_time_ms_{k}", v * 1000.0, step) for k, v in window.items()]
        return events

    def close(self) -> None:
        """Close the monitors (files, sessions)."""
        self.master.close()
