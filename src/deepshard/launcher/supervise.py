"""Run a :class:`~deepshard.launcher.runners.Plan` and never leave half a job running.

Each command (a node agent, an ``ssh``, ``pdsh``, ``srun`` or ``mpirun``) starts in its own session, so
a terminal's Ctrl-C reaches only the launcher, which then stops everything in order:

1. ask: close the command's stdin (its agent watches it and stops its ranks), or SIGTERM its process
   group when it has no watched stdin; run the plan's kill command (pdsh) on the hosts;
2. wait up to ``grace`` seconds (the agent itself gives its ranks 30 s before SIGKILL);
3. SIGKILL the process groups that are still there. Ranks die with their agent (``PR_SET_PDEATHSIG``).

The first command that exits non-zero fails the job: the others are stopped the same way, and the
launcher returns that exit code.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from types import FrameType

from deepshard.launcher.runners import Plan

logger = logging.getLogger(__name__)

POLL_S = 0.1


@contextlib.contextmanager
def _stop_signals(received: list[int]) -> Iterator[None]:
    """Record SIGINT/SIGTERM/SIGHUP in ``received`` instead of dying, for the duration."""

    def handler(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def stop(procs: list[subprocess.Popen[bytes]], plan: Plan, grace: float) -> None:
    """Stop every command of ``plan`` still running: ask, wait ``grace`` seconds, then SIGKILL."""
    running = [p for p in procs if p.poll() is None]
    for proc in running:
        if plan.stdin_pipe and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        else:
            _signal_group(proc, signal.SIGTERM)
    if plan.kill_command:
        subprocess.run(plan.kill_command, env=plan.env, check=False, timeout=grace)
    deadline = time.monotonic() + grace
    for proc in running:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.error("pid %d did not stop within %.0f s: killing its process group", proc.pid, grace)
    for proc in procs:  # also reaps leftovers in the groups of commands that did exit
        _signal_group(proc, signal.SIGKILL)
        proc.wait()


def run_plan(plan: Plan, grace: float = 40.0) -> int:
    """Start the plan's commands, wait for them and return the job's exit code.

    0 when every command succeeds; the first non-zero exit code otherwise; 128 + signal number when
    the launcher was interrupted.
    """
    received: list[int] = []
    procs: list[subprocess.Popen[bytes]] = []
    with _stop_signals(received):
        try:
            for cmd in plan.commands:
                logger.debug("starting: %s", " ".join(cmd))
                procs.append(
                    subprocess.Popen(
                        cmd,
                        env=plan.env,
                        start_new_session=True,
                        stdin=subprocess.PIPE if plan.stdin_pipe else None,
                    )
                )
            while not received:
                codes = [p.poll() for p in procs]
                failed = [(label, c) for label, c in zip(plan.labels, codes) if c]
                if failed:
                    label, code = failed[0]
                    if len(procs) > 1:
                        logger.error("%s exited with code %d: stopping the rest of the job", label, code)
                    stop(procs, plan, grace)
                    return code if code > 0 else 128 - code
                if all(c == 0 for c in codes):
                    return 0
                time.sleep(POLL_S)
            logger.warning("%s received: stopping the whole job", signal.Signals(received[0]).name)
            stop(procs, plan, grace)
            return 128 + received[0]
        except BaseException:
            stop(procs, plan, grace)
            raise
