"""DeepSpeed's import paths, and the ``import deepspeed`` alias.

``import deepshard as deepspeed`` needs nothing from here: every DeepSpeed path in
:mod:`deepshard.compat.table` is importable as ``deepshard.<path>``. :func:`install` makes the script's
own ``import deepspeed`` (and ``from deepspeed.ops.adam import ...``) resolve to deepshard without
editing it, and makes :mod:`importlib.metadata` report a ``deepspeed`` distribution so that
transformers and accelerate take their DeepSpeed code paths. The ``deepshard`` launcher turns the
alias on for the scripts it starts (``--as_deepspeed``, default ``auto``: on when DeepSpeed itself is
not installed). When both are installed and the alias is on, deepshard runs, and a warning says so.
"""

from __future__ import annotations

import importlib.machinery
import logging
import sys
from pathlib import Path

from deepshard.compat._finder import (
    ALIAS_PATH,
    DISTRIBUTION_VERSION,
    CompatModule,
    DeepSpeedFeatureNotImplemented,
    finder,
)
from deepshard.compat.table import DEEPSPEED_API_VERSION, PATHS
from deepshard.version import __version__

__all__ = [
    "ALIAS_PATH",
    "DEEPSPEED_API_VERSION",
    "DISTRIBUTION_VERSION",
    "PATHS",
    "DeepSpeedFeatureNotImplemented",
    "install",
    "installed",
    "real_deepspeed_location",
    "uninstall",
]

logger = logging.getLogger(__name__)

def real_deepspeed_location() -> str | None:
    """Where DeepSpeed itself is installed (its package directory), or ``None`` when it is not."""
    search = [p for p in sys.path if Path(p or ".").resolve() != ALIAS_PATH]
    spec = importlib.machinery.PathFinder.find_spec("deepspeed", search)
    if spec is None or spec.origin is None:
        return None
    return str(Path(spec.origin).parent)


def installed() -> bool:
    """Whether ``import deepspeed`` resolves to deepshard in this process."""
    return finder().alias


def install() -> None:
    """Make ``import deepspeed`` (and every ``deepspeed.<path>``) resolve to deepshard in this process.

    Raises ``RuntimeError`` when DeepSpeed itself was already imported (its modules cannot be
    replaced once in use): call this before anything imports ``deepspeed``.
    """
    current = sys.modules.get("deepspeed")
    if current is not None and not isinstance(current, CompatModule):
        raise RuntimeError(
            f"DeepSpeed itself is already imported (from {getattr(current, '__file__', '?')}); call "
            "deepshard.compat.install() before anything imports deepspeed, or start the script with "
            "'deepshard --as_deepspeed on'."
        )
    f = finder()
    if f.alias:
        return
    f.alias = True
    importlib.invalidate_caches()
    real = real_deepspeed_location()
    if real is not None:
        logger.warning(
            "'import deepspeed' resolves to deepshard %s (DeepSpeed %s API); the DeepSpeed installed at %s "
            "is not used while the alias is on.",
            __version__, DEEPSPEED_API_VERSION, real,
        )  # fmt: skip
    else:
        logger.info("'import deepspeed' resolves to deepshard %s (DeepSpeed %s API)", __version__, DEEPSPEED_API_VERSION)


def uninstall() -> None:
    """Turn the alias off and forget the ``deepspeed`` modules it served (deepshard's stay imported)."""
    finder().alias = False
    for name in [n for n in sys.modules if n == "deepspeed" or n.startswith("deepspeed.")]:
        module = sys.modules[name]
        if isinstance(module, CompatModule) or getattr(module, "__name__", "").startswith("deepshard"):
            del sys.modules[name]
    importlib.invalidate_caches()
