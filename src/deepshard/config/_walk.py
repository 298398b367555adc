"""The pass over the user's dict before pydantic sees it, and the translation of pydantic's errors.

The pass refuses ``"auto"`` values, applies each section's ``ALIASES``, drops inert
recognised-but-unsupported keys and refuses the others, and refuses unknown keys with the dotted
path and the closest valid key. Doing this ourselves (rather than through pydantic's ``extra``
handling) is what lets every message name the full path, suggest a key, and tell
"not supported yet" apart from "unknown".
"""

from __future__ import annotations

import functools
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any

from pydantic import ValidationError

from deepshard.config._types import StrictModel
from deepshard.config.errors import ConfigError, NotSupportedYetError, closest, join_path, show

Path = tuple[str | int, ...]


def find_auto(value: Any, path: Path = ()) -> list[str]:
    """Dotted paths of every ``"auto"`` string in the tree (HF Trainer / Accelerate placeholders)."""
    if isinstance(value, str):
        return [join_path(path)] if value.strip().lower() == "auto" else []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in find_auto(v, (*path, str(k)))]
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in find_auto(v, (*path, i))]
    return []


def auto_error(paths: Sequence[str]) -> ConfigError:
    """The error for unresolved ``"auto"`` values at ``paths``."""
    listed = ", ".join(f"'{p}'" for p in paths)
    return ConfigError(
        f'{listed} {"is" if len(paths) == 1 else "are"} "auto". "auto" is a placeholder that an integration '
        "(e.g. the Hugging Face Trainer or Accelerate) must resolve before the config reaches deepshard; "
        "replace it with a concrete value, or pass the config through the integration that fills it in."
    )


def submodel(annotation: Any) -> type[StrictModel] | None:
    """The config section class inside ``annotation`` (``X`` or ``X | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, StrictModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = submodel(arg)
            if found is not None:
                return found
    return None


def iter_keys(model: type[StrictModel], prefix: Path = ()) -> Iterator[Path]:
    """The path of every key the schema knows: fields, aliases and recognised-but-unsupported keys."""
    for name, info in model.model_fields.items():
        yield (*prefix, name)
        sub = submodel(info.annotation)
        if sub is not None:
            yield from iter_keys(sub, (*prefix, name))
    for key in (*model.ALIASES, *model.NOT_SUPPORTED):
        yield (*prefix, key)


@functools.cache
def _paths_by_leaf(root: type[StrictModel]) -> dict[str, list[str]]:
    index: dict[str, list[str]] = {}
    for path in iter_keys(root):
        index.setdefault(str(path[-1]), []).append(join_path(path))
    return index


def _unknown_key(root: type[StrictModel], model: type[StrictModel], path: Path, value: Any) -> ConfigError:
    key = str(path[-1])
    known = [*model.model_fields, *model.ALIASES, *model.NOT_SUPPORTED]
    message = f"Unknown config key '{join_path(path)}' (value {show(value)})."
    best = closest(key, known)
    elsewhere = [p for p in _paths_by_leaf(root).get(key, []) if p != join_path(path)]
    if best is not None:
        message += f" Did you mean '{best}'?"
    elif elsewhere:
        message += f" '{key}' is valid only as {' or '.join(repr(p) for p in elsewhere)}; move it there."
    else:
        section = f"'{join_path(path[:-1])}'" if len(path) > 1 else "the top level"
        message += f" Valid keys of {section} are listed in docs/config.md."
    return ConfigError(message)


def prepare(
    root: type[StrictModel], model: type[StrictModel], data: dict[str, Any], path: Path = ()
) -> dict[str, Any]:
    """Return a copy of ``data`` ready for ``model``: aliases renamed, inert unsupported keys dropped.

    Raises :class:`ConfigError` for an unknown key or an alias given together with its canonical
    key, and :class:`NotSupportedYetError` for a recognised key whose value asks for something
    deepshard does not implement yet.
    """
    out: dict[str, Any] = {}
    for key, value in data.items():
        here = (*path, str(key))
        name = model.ALIASES.get(key, key)
        if name != key and name in data:
            raise ConfigError(
                f"Both '{join_path(here)}' and '{join_path((*path, name))}' are set; '{key}' is another name "
                f"for '{name}', so keep only one of them."
            )
        if name in model.model_fields:
            sub = submodel(model.model_fields[name].annotation)
            out[name] = (
                prepare(root, sub, value, (*path, name))
                if sub is not None and isinstance(value, dict)
                else value
            )
        elif key in model.NOT_SUPPORTED:
            rule = model.NOT_SUPPORTED[key]
            if not rule.inert(value):
                fix = f"remove it, or set it to {rule.accepted}," if rule.accepted else "remove it"
                raise NotSupportedYetError(
                    f"'{join_path(here)}' ({rule.what}) is a DeepSpeed key that deepshard does not support yet; "
                    f"{fix} to continue. Got {show(value)}."
                )
        else:
            raise _unknown_key(root, model, here, value)
    return out


_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "list_type": "a list",
}
_BOUNDS = {"greater_than": "gt", "greater_than_equal": "ge", "less_than": "lt", "less_than_equal": "le"}
_BOUND_SIGNS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _describe(error: Any, path: Path) -> str:
    kind = error["type"]
    where = join_path(path)
    if kind == "missing":
        return f"{where}: missing; this key is required."
    ctx = error.get("ctx") or {}
    if kind in _EXPECTED:
        expected = _EXPECTED[kind]
    elif kind in _BOUNDS:
        bound = _BOUNDS[kind]
        expected = f"a value {_BOUND_SIGNS[bound]} {ctx[bound]}"
    elif kind == "literal_error":
        expected = f"one of {ctx['expected']}"
    elif kind == "value_error":
        return f"{where}: {str(ctx.get('error', error['msg']))}."
    else:
        expected = error["msg"][0].lower() + error["msg"][1:]
    return f"{where}: got {show(error['input'])}; expected {expected}."


def convert_validation_error(exc: ValidationError) -> ConfigError:
    """Turn a pydantic ``ValidationError`` into one :class:`ConfigError`, one line per problem."""
    lines = [_describe(err, tuple(err["loc"])) for err in exc.errors(include_url=False)]
    if len(lines) == 1:
        return ConfigError(f"Invalid config value: {lines[0]}")
    return ConfigError("Invalid config values:\n" + "\n".join(f"  - {line}" for line in lines))
