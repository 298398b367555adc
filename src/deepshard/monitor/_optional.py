"""Optional packages of the monitors: a missing one is an error that names the key and the fix."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType


def require(module: str, section: str, extra: str) -> ModuleType:
    """Import ``module`` for the config section ``section``, or raise an ImportError that says how to fix it.

    Checked on every rank (not only rank 0, which writes) so that all ranks fail together instead of
    the others waiting in a collective for a rank that stopped.
    """
    # a module already imported (or injected into sys.modules) counts even without a spec; a None
    # entry in sys.modules is Python's way to block an import
    missing = (
        sys.modules[module] is None if module in sys.modules else importlib.util.find_spec(module) is None
    )
    if missing:
        raise ImportError(
            f"'{section}.enabled' is true but the Python package '{module}' is not installed; "
            f"install it (pip install 'deepshard[{extra}]') or set '{section}.enabled' to false."
        )
    return importlib.import_module(module)
