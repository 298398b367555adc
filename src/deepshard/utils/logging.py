"""The library's logger and rank-aware logging helpers (no bare ``print`` in the library)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable

logger = logging.getLogger("deepshard")


def _configure() -> None:
    """Give the ``deepshard`` logger one stream handler unless the application configured logging."""
    if logger.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] [deepshard] %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(os.environ.get("DEEPSHARD_LOG_LEVEL", "INFO").upper())
    logger.propagate = False


_configure()


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def log_dist(message: str, ranks: Iterable[int] | None = (0,), level: int = logging.INFO) -> None:
    """Log ``message`` on the listed global ranks only (all ranks when ``ranks`` is ``None`` or has -1)."""
    rank = _rank()
    wanted = None if ranks is None else set(ranks)
    if wanted is None or -1 in wanted or rank in wanted:
        logger.log(level, "[Rank %d] %s", rank, message)


def warn_once(message: str, _seen: set[str] = set()) -> None:  # noqa: B006 - the default is the memo
    """Log a warning the first time ``message`` is seen in this process."""
    if message not in _seen:
        _seen.add(message)
        logger.warning(message)
