"""The communication logger (``comms_logger``): count, size, latency and bandwidth of each collective.

It observes :mod:`deepshard.comm` (see :func:`deepshard.comm.set_collective_observer`): every
collective issued through it is, when recorded, timed to completion — an ``async_op`` handle is waited
for and the device synchronised before the clock stops, as DeepSpeed does, so logging serialises
communication with compute. When the logger is off no observer is installed.

Records follow DeepSpeed's ``CommsLogger``: ``{name: {msg_size: [count, [latency_ms], [algbw], [busbw]]}}``
where ``msg_size`` is the bytes of the collective's ``tensor`` argument (this rank's input). Bandwidths
are in Gbps with nccl-tests' definitions (``S`` the bytes of the whole collective buffer, ``t`` the
latency, ``n`` the group size): all_reduce ``algbw = S/t``, ``busbw = algbw·2(n−1)/n``; all_gather
(``S = n·input``), reduce_scatter (``S = input``) and all_to_all: ``busbw = algbw·(n−1)/n``;
broadcast: ``busbw = algbw``. (DeepSpeed doubles all_reduce's algbw and multiplies reduce_scatter's
input by ``n``; the nccl-tests figures are the ones comparable with a link's speed.)

Not recorded: collectives that call ``torch.distributed`` directly instead of :mod:`deepshard.comm`.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import torch

from deepshard import comm
from deepshard.config._observability import CommsLoggerConfig
from deepshard.utils.logging import log_dist

# collective name -> (S / tensor bytes as a function of n, busbw / algbw as a function of n)
_BANDWIDTH: dict[str, tuple[Callable[[int], float], Callable[[int], float]]] = {
    "all_reduce": (lambda n: 1.0, lambda n: 2 * (n - 1) / n),
    "all_gather": (lambda n: float(n), lambda n: (n - 1) / n),
    "all_gather_into_tensor": (lambda n: float(n), lambda n: (n - 1) / n),
    "reduce_scatter_tensor": (lambda n: 1.0, lambda n: (n - 1) / n),
    "all_to_all_single": (lambda n: 1.0, lambda n: (n - 1) / n),
    "broadcast": (lambda n: 1.0, lambda n: 1.0),
    "barrier": (lambda n: 1.0, lambda n: 1.0),
}


def bandwidth_gbps(op: str, msg_size: int, latency_ms: float, world_size: int) -> tuple[float, float]:
    """``(algbw, busbw)`` in Gbps of collective ``op`` moving ``msg_size`` input bytes in ``latency_ms``."""
    if latency_ms <= 0 or msg_size == 0:
        return 0.0, 0.0
    total, bus = _BANDWIDTH.get(op, (lambda n: 1.0, lambda n: 1.0))
    algbw = msg_size * total(world_size) * 8 / (latency_ms * 1e6)  # bytes/ms -> Gbit/s
    return algbw, algbw * bus(world_size)


def convert_size(size_bytes: int) -> str:
    """``1.5 KB``-style size (powers of 1024), DeepSpeed's ``convert_size``."""
    if size_bytes == 0:
        return "0B"
    names = ("B", "KB", "MB", "GB", "TB", "PB")
    i = min(int(math.floor(math.log(size_bytes, 1024))), len(names) - 1)
    return f"{round(size_bytes / 1024**i, 2)} {names[i]}"


def _msg_size(args: tuple[Any, ...], kwargs: dict[str, Any], op: str) -> int:
    """Bytes of the ``tensor`` argument: the 2nd positional for the gather/scatter/all-to-all ops, else the 1st."""
    position = (
        1
        if op in ("all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single")
        else 0
    )
    tensor = kwargs.get("tensor", args[position] if len(args) > position else None)
    if isinstance(tensor, torch.Tensor):
        return tensor.element_size() * tensor.nelement()
    return 0


def _trim_mean(values: list[float], proportion: float = 0.1) -> float:
    """Mean after dropping ``proportion`` of the values at each end (DeepSpeed's ``trim_mean``)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    cut = int(len(ordered) * proportion)
    kept = ordered[cut : len(ordered) - cut] or ordered
    return sum(kept) / len(kept)


class CommsLogger:
    """Records collectives while installed as :mod:`deepshard.comm`'s observer (DeepSpeed's ``CommsLogger``)."""

    def __init__(self) -> None:
        self.comms_dict: dict[str, dict[int, list[Any]]] = {}
        self.enabled = False
        self.prof_all = True
        self.prof_ops: list[str] = []
        self.verbose = False
        self.debug = False

    # ------------------------------------------------------------------ configuration
    def configure(self, config: CommsLoggerConfig) -> None:
        """Take the settings of a ``comms_logger`` section and install or remove the observer."""
        self.prof_all, self.prof_ops = config.prof_all, list(config.prof_ops)
        self.verbose, self.debug = config.verbose, config.debug
        self.set_enabled(config.enabled)

    def set_enabled(self, enabled: bool) -> None:
        """Start (install the observer) or stop recording."""
        self.enabled = enabled
        if enabled:
            comm.set_collective_observer(self.observe)
        elif comm._observer == self.observe:
            comm.set_collective_observer(None)

    def start_profiling_comms(self) -> None:
        """Record every collective."""
        self.prof_all = True

    def stop_profiling_comms(self) -> None:
        """Record only the collectives named in ``prof_ops``."""
        self.prof_all = False

    def start_profiling_op(self, op_name_list: list[str]) -> None:
        """Add names to ``prof_ops``."""
        self.prof_ops = sorted(set(self.prof_ops) | set(op_name_list))

    def stop_profiling_op(self, op_name_list: list[str]) -> None:
        """Remove names from ``prof_ops``."""
        self.prof_ops = [op for op in self.prof_ops if op not in op_name_list]

    # ------------------------------------------------------------------ recording
    def observe(self, op: str, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """Run collective ``fn``; when recorded, wait for it and add its latency and size to the records."""
        if not (self.prof_all or op in self.prof_ops):
            return fn(*args, **kwargs)
        size = _msg_size(args, kwargs, op)
        name = f"{op} | [Caller Func: {sys._getframe(2).f_code.co_name}]" if self.debug else op
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        if result is not None and hasattr(result, "wait"):
            result.wait()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        self.append(op, name, (time.perf_counter() - start) * 1000.0, size)
        return result

    def append(self, raw_name: str, record_name: str, latency: float, msg_size: int) -> None:
        """Add one collective of ``msg_size`` bytes that took ``latency`` ms under ``record_name``."""
        algbw, busbw = bandwidth_gbps(raw_name, msg_size, latency, comm.get_world_size())
        record = self.comms_dict.setdefault(record_name, {}).setdefault(msg_size, [0, [], [], []])
        record[0] += 1
        record[1].append(latency)
        record[2].append(algbw)
        record[3].append(busbw)
        if self.verbose:
            log_dist(
                f"comm op: {record_name} | time (ms): {latency:.2f} | msg size: {convert_size(msg_size)} | "
                f"algbw (Gbps): {algbw:.2f} | busbw (Gbps): {busbw:.2f}",
                ranks=[0],
            )

    # ------------------------------------------------------------------ queries (DeepSpeed's names)
    def get_raw_data(self) -> dict[str, dict[int, list[Any]]]:
        """The records, ``{name: {msg_size: [count, [latency_ms], [algbw], [busbw]]}}`` (a shallow copy)."""
        return dict(self.comms_dict)

    def has_data(self) -> bool:
        """Whether anything was recorded."""
        return bool(self.comms_dict)

    def reset_data(self) -> None:
        """Forget all records."""
        self.comms_dict.clear()

    def get_operation_names(self) -> list[str]:
        """Names recorded so far."""
        return list(self.comms_dict)

    def get_total_operations(self) -> int:
        """Collectives recorded so far."""
        return sum(rec[0] for sizes in self.comms_dict.values() for rec in sizes.values())

    def get_operation_summary(self, operation_name: str) -> dict[int, dict[str, Any]] | None:
        """Per message size: count, total and trimmed-mean latency (ms), mean algbw and busbw (Gbps)."""
        sizes = self.comms_dict.get(operation_name)
        if sizes is None:
            return None
        return {
            size: {
                "count": rec[0],
                "total_latency_ms": sum(rec[1]),
                "avg_latency_ms": _trim_mean(rec[1]),
                "tput_avg_gbps": _trim_mean(rec[2]),
                "busbw_avg_gbps": _trim_mean(rec[3]),
                "msg_size_bytes": size,
                "msg_size_str": convert_size(size),
            }
            for size, rec in sorted(sizes.items())
        }

    def summary_text(self) -> str:
        """DeepSpeed's table: one block per collective, one row per message size."""
        columns = ("Comm. Op", "Message Size", "Count", "Total Latency(ms)", "Avg Latency(ms)",
                   "tput_avg (Gbps)", "busbw_avg (Gbps)")  # fmt: skip
        lines = ["".join(f"{c: <20}" for c in columns)]
        for name in list(self.comms_dict):
            lines.append(name)
            for row in (self.get_operation_summary(name) or {}).values():
                lines.append(
                    f"{' ': <20}{row['msg_size_str']: <20}{row['count']: <20}{row['total_latency_ms']: <20.2f}"
                    f"{row['avg_latency_ms']: <20.2f}{row['tput_avg_gbps']: <20.2f}{row['busbw_avg_gbps']: <20.2f}"
                )
        return "\n".join(lines)

    def log_all(
        self, print_log: bool = True, show_straggler: bool = False, return_dict: bool = False
    ) -> dict[str, Any] | None:
        """Log the table on rank 0 (``print_log``) and/or return ``{"summary", "straggler_analysis", "metadata"}``."""
        if show_straggler:
            raise ValueError(
                "comms logger: show_straggler=True (straggler analysis across ranks) is not implemented in "
                "deepshard; call log_summary() without it."
            )
        if print_log:
            log_dist("\n" + self.summary_text(), ranks=[0], level=logging.INFO)
        if not return_dict:
            return None
        return {
            "summary": {name: self.get_operation_summary(name) for name in self.comms_dict},
            "straggler_analysis": None,
            "metadata": {
                "world_size": comm.get_world_size(),
                "rank": comm.get_rank(),
                "timestamp": datetime.now().isoformat(),
            },
        }


comms_logger = CommsLogger()
"""The process's logger (DeepSpeed keeps one per process too: ``deepspeed.comm.comms_logger``)."""


def configure(
    deepspeed_config: Any = None,
    enabled: bool | None = None,
    prof_all: bool | None = None,
    prof_ops: list[str] | None = None,
    verbose: bool | None = None,
    debug: bool | None = None,
) -> None:
    """DeepSpeed's ``deepspeed.comm.configure``: the config's ``comms_logger`` section, then the arguments."""
    if deepspeed_config is not None:
        section = getattr(deepspeed_config, "comms_logger", deepspeed_config)
        if not isinstance(section, CommsLoggerConfig):
            raise ValueError(
                f"configure(deepspeed_config=...) needs a DeepShardConfig or CommsLoggerConfig, got {type(section).__name__}"
            )
        comms_logger.configure(section)
    if prof_all is not None:
        comms_logger.prof_all = prof_all
    if prof_ops is not None:
        comms_logger.prof_ops = list(prof_ops)
    if verbose is not None:
        comms_logger.verbose = verbose
    if debug is not None:
        comms_logger.debug = debug
    if enabled is not None:
        comms_logger.set_enabled(enabled)


def log_summary(show_straggler: bool = False, return_dict: bool = False) -> dict[str, Any] | None:
    """Barrier, then log the table on rank 0 (and return it as a dict when ``return_dict``)."""
    was = comm._observer
    comm.set_collective_observer(None)  # the barrier itself is not a collective of the training
    try:
        comm.barrier()
    finally:
        comm.set_collective_observer(was)
    return comms_logger.log_all(print_log=True, show_straggler=show_straggler, return_dict=return_dict)
