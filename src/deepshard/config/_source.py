"""Turn what the user passed (a dict, a JSON file path, or base64-encoded JSON) into a plain dict.

Mirrors DeepSpeed's ``DeepSpeedConfig``: a string that names an existing file is read as JSON;
any other string is decoded as (URL-safe) base64 JSON. Duplicate keys in JSON are an error.
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deepshard.config.errors import ConfigError, show


def _no_duplicates(where: str) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise ConfigError(
                    f"Duplicate key '{key}' in {where} (in the object with keys {sorted(out)}); "
                    "JSON keeps only the last one, so remove the duplicate."
                )
            out[key] = value
        return out

    return hook


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates(where))
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"{where} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}."
        ) from None


def _read_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"Cannot read the config file '{path}': {exc}.") from None
    return _parse_json(text, f"config file '{path}'")


def _decode_base64(text: str) -> Any:
    try:
        decoded = base64.urlsafe_b64decode(text.strip().encode("ascii")).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        decoded = ""
    if not decoded.lstrip().startswith("{"):
        hint = (
            " (it looks like a file path)" if text.endswith(".json") or "/" in text or os.sep in text else ""
        )
        raise ConfigError(
            f"Config {show(text)} is neither an existing file{hint} nor base64-encoded JSON; pass a dict, "
            "the path of an existing ds_config.json, or base64-encoded JSON."
        )
    return _parse_json(decoded, "the base64-encoded config")


def read_source(source: Mapping[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """Return the config as a fresh ``dict`` (a deep copy for mappings, so the caller's object is untouched)."""
    if isinstance(source, Mapping):
        data: Any = copy.deepcopy(dict(source))
    elif isinstance(source, os.PathLike):
        path = Path(source)
        if not path.exists():
            raise ConfigError(f"Config file '{path}' does not exist.")
        data = _read_file(path)
    elif isinstance(source, str):
        data = _read_file(Path(source)) if os.path.exists(source) else _decode_base64(source)
    else:
        raise ConfigError(
            f"Config source of type {type(source).__name__} is not supported; pass a dict, a path to a "
            "ds_config.json, base64-encoded JSON, or a DeepShardConfig."
        )
    if not isinstance(data, dict):
        raise ConfigError(f"The config must be a JSON object at the top level, got {show(data)}.")
    return data
