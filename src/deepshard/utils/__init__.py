"""Helpers under DeepSpeed's ``deepspeed.utils`` names: logging and the ZeRO fragment API."""

from __future__ import annotations

import importlib
from typing import Any

from deepshard.utils.logging import log_dist, logger

_FRAGMENT_API = (
    "safe_get_full_fp32_param",
    "safe_set_full_fp32_param",
    "safe_get_full_grad",
    "safe_set_full_grad",
    "safe_get_full_optimizer_state",
    "safe_set_full_optimizer_state",
    "safe_get_local_fp32_param",
    "safe_set_local_fp32_param",
    "safe_get_local_grad",
    "safe_get_local_optimizer_state",
    "safe_set_local_optimizer_state",
)

__all__ = ["log_dist", "logger", *_FRAGMENT_API]  # noqa: PLE0604


def __getattr__(name: str) -> Any:
    # Imported lazily: utils sits below zero in the import order.
    if name in _FRAGMENT_API:
        return getattr(importlib.import_module("deepshard.zero.fragments"), name)
    raise AttributeError(f"module 'deepshard.utils' has no attribute {name!r}")
