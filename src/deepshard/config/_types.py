"""Building blocks shared by every config section: the strict frozen base model, number and dtype
types that read JSON the way DeepSpeed users write it, and the record of recognised-but-unsupported keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict


def integral(value: Any) -> Any:
    """Accept integral floats such as ``5e8`` as ints (JSON has no int/float split); reject bools."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {'true' if value else 'false'}")
    if isinstance(value, float):
        if not math.isfinite(value) or not value.is_integer():
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value)
    return value


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return value


Int = Annotated[int, BeforeValidator(integral)]
"""An integer; integral floats (``5e8``, ``1.0``) are accepted, fractions and booleans are not."""

Float = Annotated[float, AfterValidator(_finite)]
"""A finite number (ints are accepted); booleans, ``NaN`` and infinities are not."""

DTypeName = Literal["fp32", "fp16", "bf16"]

# Every spelling DeepSpeed's ``DtypeEnum`` accepts (matched case-insensitively) -> the canonical name.
_DTYPE_SPELLINGS: dict[str, DTypeName] = {
    **dict.fromkeys(["fp32", "float32", "float", "torch.float32"], "fp32"),
    **dict.fromkeys(["fp16", "float16", "half", "torch.float16"], "fp16"),
    **dict.fromkeys(["bf16", "bfloat16", "torch.bfloat16"], "bf16"),
}


def _normalize_dtype(value: Any) -> Any:
    if isinstance(value, str):
        canonical = _DTYPE_SPELLINGS.get(value.strip().lower())
        if canonical is None:
            raise ValueError(
                f"expected one of 'fp32', 'fp16', 'bf16' (or {', '.join(map(repr, _DTYPE_SPELLINGS))}), got {value!r}"
            )
        return canonical
    return value


DType = Annotated[DTypeName, BeforeValidator(_normalize_dtype)]
"""A floating-point dtype name, normalised to ``"fp32"``, ``"fp16"`` or ``"bf16"``."""


@dataclass(frozen=True)
class Unsupported:
    """A DeepSpeed key that deepshard recognises but does not implement yet.

    ``inert`` says whether a value asks for nothing (DeepSpeed's default, or a section that is
    switched off); such a value is accepted and has no effect. Any other value raises
    :class:`~deepshard.config.NotSupportedYetError`. ``accepted`` describes the inert values for
    error messages and docs (empty when no value is inert).
    """

    what: str
    accepted: str
    inert: Callable[[Any], bool]


def equals(default: Any) -> Unsupported:
    """Inert when the value equals DeepSpeed's ``default`` (``what`` is filled in by :func:`unsupported`)."""
    return Unsupported(
        "", f"`{json_literal(default)}` (the DeepSpeed default)", lambda v: v == default and type(v) is type(default)
    )


def false_or_null() -> Unsupported:
    """Inert when the value is ``false`` or ``null`` (DeepSpeed's unset default for deprecated switches)."""
    return Unsupported("", "`false` or `null` (the DeepSpeed default)", lambda v: v is None or v is False)


def switched_off() -> Unsupported:
    """Inert when the section is ``{}`` or has ``"enabled": false``."""
    return Unsupported(
        "",
        '`{}` or `{"enabled": false}`',
        lambda v: isinstance(v, dict) and (not v or v.get("enabled") is False),
    )


def all_defaults(defaults: Mapping[str, Any]) -> Unsupported:
    """Inert when every key of the section is one of ``defaults`` and equal to it."""
    shown = ", ".join(f'"{k}": {json_literal(v)}' for k, v in defaults.items())

    def inert(v: Any) -> bool:
        return isinstance(v, dict) and all(k in defaults and defaults[k] == val for k, val in v.items())

    return Unsupported("", f"`{{}}` or only DeepSpeed's defaults ({shown})", inert)


def empty() -> Unsupported:
    """Inert only when the section is ``{}``."""
    return Unsupported("", "`{}`", lambda v: v == {})


def refused() -> Unsupported:
    """Never inert: DeepSpeed acts on the key whenever it is present."""
    return Unsupported("", "", lambda v: False)


def unsupported(what: str, rule: Unsupported) -> Unsupported:
    """Name a recognised-but-unsupported key: ``what`` it does in DeepSpeed, and when it is inert."""
    return Unsupported(what, rule.accepted, rule.inert)


def json_literal(value: Any) -> str:
    """``value`` spelled as in JSON (``null``, ``true``, quoted strings)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)


class StrictModel(BaseModel):
    """Base of every config section: strict types, unknown keys forbidden, immutable once built.

    ``ALIASES`` maps an alternative JSON key DeepSpeed accepts to the field it sets. ``NOT_SUPPORTED``
    lists DeepSpeed keys of this section that deepshard recognises but does not implement yet.
    Both are applied by the loader before pydantic sees the data.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)

    ALIASES: ClassVar[Mapping[str, str]] = {}
    NOT_SUPPORTED: ClassVar[Mapping[str, Unsupported]] = {}
