"""Whole values of ZeRO-3 parameters outside forward/backward: a context, and the full state dict.

Between steps a stage-3 parameter shows a placeholder of its real shape (see
:mod:`deepshard.zero.shard_group`). Inside :class:`GatheredParameters` the groups holding the given
parameters are gathered and the parameters show their values; with ``modifier_rank`` set, what that
rank wrote into them is broadcast and becomes every rank's shard (and fp32 master) on exit, as in
DeepSpeed. ``module.state_dict()`` holds this rank's dim-0 rows of each sharded parameter; use
:func:`full_state_dict` for whole tensors. Parameters not under stage 3 pass through unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from types import TracebackType
from typing import Any

import torch

from deepshard import comm
from deepshard.zero.init_gather import InitGather, init_group
from deepshard.zero.rows import OWNERS


def _group_of(param: torch.Tensor) -> Any:
    """The ShardGroup holding ``param`` (which knows its runtime), or ``None`` for a whole parameter."""
    return OWNERS.get(param)


class GatheredParameters:
    """Gather ZeRO-3 parameters for the duration of a ``with`` block (collective on the data-parallel group).

    ``params``: a parameter or an iterable of them. ``modifier_rank``: the rank whose in-place edits are
    kept (``None``: read only). ``fwd_module``: accepted for DeepSpeed compatibility (externally used
    parameters are declared with :func:`~deepshard.zero.register_external_parameter`).
    ``enabled=False`` makes the block a no-op.
    """

    def __init__(
        self,
        params: torch.Tensor | Iterable[torch.Tensor],
        modifier_rank: int | None = None,
        fwd_module: torch.nn.Module | None = None,
        enabled: bool = True,
    ) -> None:
        del fwd_module
        items = [params] if isinstance(params, torch.Tensor) else list(params)
        self.params = [p for p in items if p is not None]
        self.modifier_rank = modifier_rank
        self.enabled = enabled
        self.groups: list[Any] = []
        built: dict[int, tuple[Any, list[torch.Tensor]]] = {}  # zero.Init parameters not yet in an engine
        plain: list[torch.Tensor] = []
        for p in self.params:
            g = _group_of(p)
            if g is not None:
                if g not in self.groups:
                    self.groups.append(g)
                continue
            partitioned, init_pg = init_group(p)
            if partitioned:
                built.setdefault(id(init_pg), (init_pg, []))[1].append(p)
            else:
                plain.append(p)
        self.init_gathers = [InitGather(ps, pg) for pg, ps in built.values()]
        self.plain = plain
        self.runtime = self.groups[0].runtime if self.groups else None

    def __enter__(self) -> GatheredParameters:
        if self.enabled and self.runtime is not None:
            self.runtime.fetch(self.groups, "GatheredParameters")
        if self.enabled:
            for gather in self.init_gathers:
                gather.gather()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.enabled:
            return
        adopt = self.modifier_rank is not None and exc_type is None
        for gather in self.init_gathers:
            gather.release(self.modifier_rank if adopt else None)
        if adopt:
            self._adopt_modifications()
        if self.runtime is not None:
            self.runtime.unuse(self.groups, keep=False)

    @torch.no_grad()
    def _adopt_modifications(self) -> None:
        """Broadcast the modifier rank's values and make them this rank's shards and masters."""
        assert self.modifier_rank is not None
        partition = self.runtime.partition if self.runtime is not None else None
        if partition is not None:
            partition.begin_update()
        with partition.resident() if partition is not None else contextlib.nullcontext():
            self._broadcast_and_write_back(partition)

    def _broadcast_and_write_back(self, partition: Any) -> None:
        assert self.modifier_rank is not None
        if comm.is_initialized() and comm.get_world_size() > 1:
            group = partition.group if partition is not None else None
            src = comm.get_global_rank(group, self.modifier_rank)
            tensors = [g.full for g in self.groups]
            tensors += [p.data for p in self.plain]
            for t in tensors:
                comm.broadcast(t, src=src, group=group)
        for g in self.groups:
            g.write_back()
        if partition is not None:
            partition.masters.copy_from_model()
            partition.fence()


def full_state_dict(module: torch.nn.Module, cpu: bool = False) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` with every ZeRO-3 parameter whole (collective; one group gathered at a time).

    Tensors are copies (on the host with ``cpu=True``); names and order are those of ``state_dict()``.
    """
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if _group_of(p) is not None:
            names.setdefault(id(p), []).append(name)
    state = module.state_dict()
    whole: dict[str, torch.Tensor] = {}
    groups: list[Any] = []
    for p in module.parameters():
        g = _group_of(p)
        if g is not None and g not in groups:
            groups.append(g)
    for g in groups:
        with GatheredParameters(g.params):
            for p in g.params:
                copy = p.detach().to("cpu" if cpu else p.device, copy=True)
                for name in names.get(id(p), []):  # tied names share one tensor, as in state_dict()
                    whole[name] = copy
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key in whole:
            out[key] = whole[key]
        else:
            out[key] = value.detach().to("cpu" if cpu else value.device, copy=True)
    return out
