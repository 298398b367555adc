"""The ``deepshard`` command: subcommands by name, otherwise the launcher.

``deepshard report ...`` runs a subcommand; ``deepshard [launcher flags] script.py args`` (anything whose
first word is not a subcommand) launches a job, exactly like ``deepspeed``. Subcommands are imported
only when called, so that launching stays free of their imports.
"""

from __future__ import annotations

import importlib
import logging
import sys

# subcommand -> "module:function"; the function takes the remaining argv and returns an exit code
SUBCOMMANDS: dict[str, str] = {
    "report": "deepshard.launcher.report:main",
    "convert": "deepshard.checkpoint.convert:main",
    "estimate": "deepshard.profiling.estimate_cli:main",
    "plot": "deepshard.monitor.plot:main",
    "serve": "deepshard.serve.cli:main",
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``deepshard`` console script and of ``python -m deepshard.launcher``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="deepshard: %(message)s")
    if any(a == "--autotuning" or a.startswith("--autotuning=") for a in argv):
        from deepshard.autotuning.tuner import main as autotune

        return autotune(argv)
    if argv and argv[0] in SUBCOMMANDS:
        module_name, _, function = SUBCOMMANDS[argv[0]].partition(":")
        command = getattr(importlib.import_module(module_name), function)
        return int(command(argv[1:]))
    from deepshard.launcher.launch import main as launch

    return launch(argv)
