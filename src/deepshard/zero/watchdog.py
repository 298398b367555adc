"""ZeRO-3's collective watchdog: a rank that waits for a collective its peers never issue fails, naming it.

Stage-3 gathers run on a process group of their own whose timeout is the watchdog's
(``DEEPSHARD_COLLECTIVE_TIMEOUT`` seconds, default 600). When a rank skips a block the others run, its
peers' next all-gather matches a different unit (caught at once by the gather's fingerprint, see
:mod:`deepshard.zero.shard_group`) or waits for a rank that never comes; the backend's timeout then
surfaces here as a :class:`CollectiveTimeoutError` that says which rank waited, for which unit and pass.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

ENV_TIMEOUT = "DEEPSHARD_COLLECTIVE_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0


class CollectiveDivergedError(RuntimeError):
    """Ranks issued different collectives (their code paths through the model differ)."""


class CollectiveTimeoutError(RuntimeError):
    """A collective did not complete within the watchdog timeout."""


def watchdog_timeout() -> datetime.timedelta:
    """The timeout of stage-3 collectives, from ``DEEPSHARD_COLLECTIVE_TIMEOUT`` (seconds)."""
    raw = os.environ.get(ENV_TIMEOUT)
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"{ENV_TIMEOUT}={raw!r} is not a number of seconds; set it to e.g. 600") from None
    if seconds <= 0:
        raise ValueError(f"{ENV_TIMEOUT}={raw!r} must be positive (seconds)")
    return datetime.timedelta(seconds=seconds)


def wait_collective(work: Any, what: str, rank: int) -> None:
    """Wait for ``work``; turn a backend timeout into an error naming ``rank`` and ``what``."""
    try:
        work.wait()
    except RuntimeError as err:
        text = str(err)
        if "imed out" in text or "timeout" in text.lower() or "closure" in text:
            raise CollectiveTimeoutError(
                f"rank {rank} waited more than {watchdog_timeout().total_seconds():g} s for the {what}, which "
                "the other ranks did not issue: the ranks took different code paths through the model (a "
                "block skipped on some ranks). Mark data-dependent blocks with "
                f"deepshard.zero.set_z3_leaf_modules(); {ENV_TIMEOUT} sets this timeout. Backend error: {text}"
            ) from err
        raise
