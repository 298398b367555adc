"""Per-parameter facts kept beside the parameters, never as attributes glued onto them.

Two facts outlive the call that made them and must be found from a bare parameter:

* :data:`LOCAL_ROWS` — this rank's dim-0 rows of a parameter that ``zero.Init`` built sharded (the
  parameter itself holds only a placeholder) until a stage-3 partition's :class:`ShardGroup` adopts
  them into its segment and drops the entry.
* :data:`OWNERS` — the :class:`ShardGroup` that holds a stage-3 parameter, registered by the partition's
  runtime, so that ``GatheredParameters(param)`` (user API, handed only parameters) finds what to gather.

Both are keyed by parameter identity and hold their keys weakly (``torch.utils.weak``): a parameter that
is dropped takes its entry with it, and a tensor's elementwise ``==`` is never called. The maps are
process-wide because ``zero.Init`` runs before any partition exists and ``GatheredParameters`` is handed
parameters only; the partition is the only writer after construction.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import torch
from torch.utils.weak import WeakIdKeyDictionary

V = TypeVar("V")


class ParamRegistry(Generic[V]):
    """A map from parameter (by identity, held weakly) to one value."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._map: Any = WeakIdKeyDictionary()

    def get(self, param: torch.Tensor) -> V | None:
        """The value for ``param``, or ``None``."""
        value: V | None = self._map.get(param)
        return value

    def set(self, param: torch.Tensor, value: V) -> None:
        """Record ``value`` for ``param`` (replacing any earlier one)."""
        self._map[param] = value

    def pop(self, param: torch.Tensor) -> V | None:
        """Forget ``param``; its value, or ``None``."""
        value: V | None = self._map.pop(param, None)
        return value

    def __contains__(self, param: object) -> bool:
        return isinstance(param, torch.Tensor) and param in self._map

    def __repr__(self) -> str:
        return f"ParamRegistry({self.what!r}, {len(self._map)} entries)"


RowRegistry = ParamRegistry[torch.Tensor]

LOCAL_ROWS: RowRegistry = ParamRegistry("this rank's rows of parameters built by zero.Init")
OWNERS: ParamRegistry[Any] = ParamRegistry("the ShardGroup holding each stage-3 parameter")
