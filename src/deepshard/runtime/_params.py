"""Validation of the free-form ``params`` mappings of the ``optimizer`` and ``scheduler`` config sections.

Both sections pass ``params`` straight to a constructor, as DeepSpeed does. Checking the names against the
constructor's signature first turns a typo into a ``ConfigError`` that names the dotted path and the
closest valid key, instead of a ``TypeError`` about an unexpected keyword argument.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection, Mapping
from typing import Any

from deepshard.config.errors import ConfigError, did_you_mean

# Leading constructor arguments that the builder supplies itself, never the config.
_SUPPLIED = frozenset({"self", "params", "optimizer"})


def signature_params(fn: Callable[..., Any]) -> dict[str, inspect.Parameter]:
    """Keyword parameters of ``fn`` that a config may set (``self``/``params``/``optimizer`` and ``*args`` removed)."""
    return {
        name: p
        for name, p in inspect.signature(fn).parameters.items()
        if name not in _SUPPLIED and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def check_param_names(section: str, owner: str, params: Mapping[str, Any], valid: Collection[str]) -> None:
    """Raise ``ConfigError`` for a key of ``params`` outside ``valid``, or for an unresolved ``"auto"`` value.

    ``section`` is ``"optimizer"`` or ``"scheduler"``; ``owner`` names the class the keys belong to.
    """
    for key, value in params.items():
        if key not in valid:
            raise ConfigError(
                f"{section}.params.{key} is not a parameter of {owner}.{did_you_mean(key, valid)} "
                f"Valid parameters: {', '.join(sorted(valid))}. Rename or remove the key in the config."
            )
        if isinstance(value, str) and value == "auto":
            raise ConfigError(
                f"{section}.params.{key} is 'auto', which must be resolved to a value before the {section} "
                f"is built (the Hugging Face Trainer integration does this). Set a number in the config."
            )


def check_required(section: str, owner: str, params: Mapping[str, Any], fn: Callable[..., Any]) -> None:
    """Raise ``ConfigError`` naming the first parameter of ``fn`` without a default that ``params`` lacks."""
    for name, p in signature_params(fn).items():
        if p.default is inspect.Parameter.empty and name not in params:
            raise ConfigError(f"{section}.params.{name} is required by {owner}; add it to the config.")
