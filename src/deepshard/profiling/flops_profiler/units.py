"""Numbers as DeepSpeed's flops profiler prints them: ``12.58 M``, ``25.17 MMACs``, ``1.2 ms``."""

from __future__ import annotations

DEFAULT_PRECISION = 2

_UNITS = (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3), ("", 1.0), ("m", 1e-3), ("u", 1e-6))


def number_to_string(num: float, units: str | None = None, precision: int = DEFAULT_PRECISION) -> str:
    """``num`` scaled to the largest unit not above it (T, G, M, K, -, m, u), e.g. ``12.58 M``."""
    if units is None:
        units, magnitude = "u", 1e-6
        for name, value in _UNITS:
            if num >= value or (value == 1.0 and num == 0):
                units, magnitude = name, value
                break
    else:
        magnitude = dict(_UNITS).get(units, 1.0)
    return f"{round(num / magnitude, precision):g} {units}"


def macs_to_string(macs: float, units: str | None = None, precision: int = DEFAULT_PRECISION) -> str:
    """``25.17 MMACs``."""
    return f"{number_to_string(macs, units, precision)}MACs"


def flops_to_string(flops: float, units: str | None = None, precision: int = DEFAULT_PRECISION) -> str:
    """``50.33 MFLOPS`` (a rate)."""
    return f"{number_to_string(flops, units, precision)}FLOPS"


def params_to_string(params: float, units: str | None = None, precision: int = DEFAULT_PRECISION) -> str:
    """``1.2 M`` parameters (``B`` for billions, as DeepSpeed writes them)."""
    units = units.replace("B", "G") if units else units
    return number_to_string(params, units, precision).replace("G", "B").strip()


def duration_to_string(seconds: float, units: str | None = None, precision: int = DEFAULT_PRECISION) -> str:
    """``1.2 ms``."""
    return f"{number_to_string(seconds, units, precision)}s"
