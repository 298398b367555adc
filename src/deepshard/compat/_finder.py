"""The import mechanism behind :mod:`deepshard.compat.table`: one meta-path finder for both names.

* ``deepshard.<path>`` for a table path that is not a real deepshard module: a :class:`CompatModule`
  built from the table row (always on, so ``import deepshard as deepspeed`` scripts reach the same
  paths).
* ``deepspeed`` and ``deepspeed.<path>`` only while the alias is on (:func:`set_alias`):
  ``deepspeed`` is a :class:`CompatModule` over ``deepshard`` (plus the table's top-level names); a
  table path is its :class:`CompatModule` (the same object as ``deepshard.<path>``); any other path
  is the deepshard module of the same path, the very object (no second copy, so classes and module
  state are shared). A path deepshard has under neither name fails with a message naming it.

The finder also reports a ``deepspeed`` distribution to :mod:`importlib.metadata` while the alias is
on (version ``<DEEPSPEED_API_VERSION>+deepshard.<version>``), which is what transformers and
accelerate check before they use DeepSpeed. It sits first on ``sys.meta_path`` so that, with the
alias on, an installed DeepSpeed is shadowed (the caller logs which one runs).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import sys
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from deepshard.compat.table import DEEPSPEED_API_VERSION, PATHS, Entry, Refused
from deepshard.version import __version__

DOCS_HINT = "see docs/compat.md for what deepshard implements of DeepSpeed's API"


class DeepSpeedFeatureNotImplemented(ImportError, NotImplementedError):
    """A DeepSpeed module or name that deepshard does not implement (an ``ImportError``, so that
    ``try: import ... except ImportError`` probes behave as without DeepSpeed)."""


def _refusal(qualified: str, refused: Refused) -> str:
    hint = f"; {refused.instead}" if refused.instead else ""
    return f"{qualified} ({refused.feature}) is not implemented by deepshard{hint}; {DOCS_HINT}."


def _refused_class(qualified: str, refused: Refused) -> type:
    """A class standing for a refused name: importing it works, building or calling it raises."""
    message = _refusal(qualified, refused)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise DeepSpeedFeatureNotImplemented(message)

    return type(qualified.rpartition(".")[2], (), {"__new__": refuse, "__doc__": message, "__module__": qualified})


def _resolve_target(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr) if attr else module


def _ds_name(path: str) -> str:
    return f"deepspeed.{path}" if path else "deepspeed"


def is_real(path: str) -> bool:
    """Whether deepshard has a module of its own at ``deepshard.<path>`` (found on disk, not in the table)."""
    if not path:
        return True
    parent_name, _, child = f"deepshard.{path}".rpartition(".")
    parent = sys.modules.get(parent_name)
    if parent is None:
        try:
            parent = importlib.import_module(parent_name)
        except ImportError:
            return False
    search = getattr(parent, "__path__", None)
    if search is None or isinstance(parent, CompatModule):
        return False
    return importlib.machinery.PathFinder.find_spec(f"{parent_name}.{child}", list(search)) is not None


def lookup(path: str, name: str, qualified: str, extended: bool = True) -> Any:
    """Attribute ``name`` of the DeepSpeed module at ``path`` (imported as ``qualified``): a table name,
    a table submodule, or (``extended``) a name or submodule of the deepshard module it extends."""
    entry = PATHS.get(path)
    if isinstance(entry, Entry):
        value = entry.names.get(name)
        if isinstance(value, Refused):
            return _refused_class(f"{qualified}.{name}", value)
        if value is not None:
            return _resolve_target(value)
    sub = f"{path}.{name}" if path else name
    if sub in PATHS:
        try:
            return importlib.import_module(f"{qualified}.{name}")
        except DeepSpeedFeatureNotImplemented as exc:  # hasattr() must see an AttributeError
            raise AttributeError(str(exc)) from exc
    if extended and isinstance(entry, Entry) and entry.extends is not None:
        base = importlib.import_module(entry.extends)
        try:
            return getattr(base, name)
        except AttributeError:
            pass
        if is_real(sub):
            return importlib.import_module(f"{entry.extends}.{name}")
    raise AttributeError(
        f"module {qualified!r} has no attribute {name!r}: DeepSpeed's {_ds_name(path)}.{name} is not "
        f"implemented by deepshard; {DOCS_HINT}"
    )


class CompatModule(types.ModuleType):
    """A DeepSpeed module served from the table: names resolve lazily, on first use."""

    def __init__(self, name: str, path: str) -> None:
        super().__init__(name)
        self.__path__: list[str] = []  # a package: its table subpaths are imported through the finder
        self._deepspeed_path = path
        entry = PATHS[path]
        assert isinstance(entry, Entry)
        self.__doc__ = f"DeepSpeed's {_ds_name(path)}, served by deepshard (deepshard.compat.table)."
        self.__all__ = sorted(entry.names)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        value = lookup(self._deepspeed_path, name, self.__name__)
        setattr(self, name, value)
        return value

    def __dir__(self) -> list[str]:
        prefix = f"{self._deepspeed_path}." if self._deepspeed_path else ""
        subs = {p[len(prefix):].split(".")[0] for p in PATHS if p.startswith(prefix) and p != self._deepspeed_path}
        return sorted(set(super().__dir__()) | set(self.__all__) | subs)


class _TableLoader(importlib.abc.Loader):
    """Builds (once) the :class:`CompatModule` of a table path; both names get that one object."""

    def __init__(self, path: str) -> None:
        self.path = path

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        entry = PATHS[self.path]
        if isinstance(entry, Refused):
            raise DeepSpeedFeatureNotImplemented(_refusal(_ds_name(self.path), entry), name=spec.name)
        if entry.extends is not None:  # an extended module exists only under DeepSpeed's name
            return CompatModule(spec.name, self.path)
        twin = sys.modules.get(f"deepshard.{self.path}") if spec.name.startswith("deepspeed") else None
        return twin if twin is not None else CompatModule(f"deepshard.{self.path}", self.path)

    def exec_module(self, module: types.ModuleType) -> None:
        if isinstance(module, CompatModule) and not module.__name__.startswith("deepspeed"):
            sys.modules.setdefault(module.__name__, module)


class _AliasLoader(importlib.abc.Loader):
    """Gives ``deepspeed.<path>`` the already imported module ``deepshard.<path>`` itself."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._spec: Any = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = importlib.import_module(self.target)
        self._spec = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__spec__ = self._spec  # the import system set the alias's spec; the module keeps its own


ALIAS_PATH = Path(__file__).resolve().parent / "alias_path"
"""A directory holding a ``deepspeed`` package that calls :func:`deepshard.compat.install`, and the
``deepspeed`` distribution's ``dist-info``; the launcher puts it first on the ``PYTHONPATH`` of the
scripts it starts with the alias on."""

DISTRIBUTION_VERSION = f"{DEEPSPEED_API_VERSION}+deepshard.{__version__}"
"""The ``deepspeed`` version reported with the alias on: DeepSpeed's API level plus deepshard's own."""


def _distribution() -> importlib.metadata.Distribution:
    return importlib.metadata.PathDistribution(ALIAS_PATH / f"deepspeed-{DISTRIBUTION_VERSION}.dist-info")


class CompatFinder(importlib.abc.MetaPathFinder):
    """Finds table paths under ``deepshard.`` always and everything under ``deepspeed.`` with the alias on."""

    def __init__(self) -> None:
        self.alias = False

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.startswith("deepshard."):
            rest = fullname[len("deepshard.") :]
            entry = PATHS.get(rest)
            if entry is None or (isinstance(entry, Entry) and entry.extends is not None):
                return None
            if path and importlib.machinery.PathFinder.find_spec(fullname, list(path)) is not None:
                return None  # deepshard's own module wins
            return importlib.machinery.ModuleSpec(fullname, _TableLoader(rest), is_package=True)
        if not self.alias or not (fullname == "deepspeed" or fullname.startswith("deepspeed.")):
            return None
        rest = fullname[len("deepspeed.") :] if fullname != "deepspeed" else ""
        entry = PATHS.get(rest)
        if entry is not None and (isinstance(entry, Refused) or entry.extends is not None or not is_real(rest)):
            return importlib.machinery.ModuleSpec(fullname, _TableLoader(rest), is_package=True)
        if is_real(rest):
            return importlib.machinery.ModuleSpec(fullname, _AliasLoader(f"deepshard.{rest}"))
        raise ModuleNotFoundError(
            f"No module named {fullname!r}: DeepSpeed's {fullname} is not implemented by deepshard "
            f"(the 'deepspeed' alias resolves to deepshard); {DOCS_HINT}.",
            name=fullname,
        )

    def find_distributions(
        self, context: importlib.metadata.DistributionFinder.Context | None = None
    ) -> Iterator[importlib.metadata.Distribution]:
        """The ``deepspeed`` distribution, while the alias is on."""
        name = getattr(context, "name", None) if context is not None else None
        if self.alias and (name is None or name.replace("_", "-").lower() == "deepspeed"):
            yield _distribution()


def finder() -> CompatFinder:
    """The process's finder, first on ``sys.meta_path`` (installed on first call)."""
    for f in sys.meta_path:
        if isinstance(f, CompatFinder):
            return f
    f = CompatFinder()
    sys.meta_path.insert(0, f)
    return f
