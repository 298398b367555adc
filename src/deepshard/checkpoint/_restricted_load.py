"""Load ``torch.save`` files written by another library without importing it or running its code.

DeepSpeed's checkpoint files pickle a few of DeepSpeed's own objects next to the tensors (the loss
scaler, ``ZeroStageEnum``, ``fragment_address``; older versions an ``argparse.Namespace``), so
``torch.load(weights_only=True)`` refuses them and ``weights_only=False`` would import DeepSpeed and
execute whatever callables the pickle names. Instead, :func:`load_restricted` lists the globals the
file references beyond torch's ``weights_only`` allow-list (tensors, storages, dtypes, ``torch.Size``,
``collections.OrderedDict``, builtin containers and scalars), and lets torch's ``weights_only``
unpickler resolve each of them to a fresh :class:`StandIn` subclass: an inert object that records
the constructor arguments and pickled state and has no other behaviour. No callable named by the
file is ever imported or run; the caller reads the recorded values.

Files are memory-mapped (``mmap=True``), so loading one costs address space, not memory, until its
tensors are read.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch

from deepshard.checkpoint.manifest import CorruptCheckpointError


class StandIn:
    """An inert stand-in for a class of a library that is not imported.

    ``args`` holds what the pickle passed to the class (e.g. an enum's value), and the pickled state
    (``__dict__`` of the original object) becomes this object's attributes.
    """

    qualified_name: ClassVar[str] = ""
    args: tuple[Any, ...]

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        obj = super().__new__(cls)
        obj.args = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and (state[0] is None or isinstance(state[0], dict)):
            state = {**(state[0] or {}), **(state[1] or {})}  # (__dict__, __slots__ state)
        if isinstance(state, dict):
            self.__dict__.update({str(k): v for k, v in state.items()})
        else:
            self.__dict__["state"] = state

    def __repr__(self) -> str:
        return f"StandIn({self.qualified_name}, args={self.args!r})"


def _stand_in(qualified_name: str) -> type[StandIn]:
    return type(qualified_name.rsplit(".", 1)[-1], (StandIn,), {"qualified_name": qualified_name})


def load_restricted(path: Path) -> Any:
    """The object in the ``torch.save`` file ``path``, foreign classes replaced by :class:`StandIn` objects.

    Raises :class:`CorruptCheckpointError` naming the file when it is missing, truncated or not a
    ``torch.save`` file.
    """
    try:
        unknown = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        stand_ins: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
            (_stand_in(n), n) for n in unknown
        ]
        with torch.serialization.safe_globals(stand_ins):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # a legacy (non-zip) torch.save file: read it into memory instead
                return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CorruptCheckpointError(f"DeepSpeed checkpoint file {path} is missing") from None
    except (RuntimeError, pickle.UnpicklingError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        raise CorruptCheckpointError(
            f"DeepSpeed checkpoint file {path} cannot be read: it is truncated or corrupt ({str(exc)[:200]})"
        ) from None
