"""Errors raised for bad configuration, and the helpers their messages share."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import Any


class ConfigError(ValueError):
    """A configuration value is wrong: the message names the dotted path, the value and the fix."""


class NotSupportedYetError(ConfigError):
    """A DeepSpeed key that deepshard recognises but does not implement yet."""


def closest(name: str, choices: Iterable[str]) -> str | None:
    """Return the closest entry of ``choices`` to ``name`` (case-insensitive), or ``None``."""
    pool = list(choices)
    lowered = {c.lower(): c for c in pool}
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[match[0]] if match else None


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """A ``" Did you mean 'x'?"`` suffix for error messages, or an empty string."""
    best = closest(name, choices)
    return f" Did you mean '{best}'?" if best else ""


def join_path(path: Sequence[str | int]) -> str:
    """Render a location as a dotted path: ``("zero_optimization", "stage")`` -> ``zero_optimization.stage``.

    Integer parts are list indices and render as ``[i]``; the empty path is ``<root>``.
    """
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "<root>"


def show(value: Any, limit: int = 80) -> str:
    """A short, JSON-like rendering of a user value for error messages."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    else:
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
