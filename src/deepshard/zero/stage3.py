"""ZeRO-3 at run time: gather each unit just before it runs, release it after, prefetch what comes next.

Hooks on every unit module (:mod:`deepshard.zero.units`) drive :class:`~deepshard.zero.shard_group.ShardGroup`\\ s:

* **forward pre-hook** — gather the groups the module needs (its own, and the owners of tied or
  externally registered parameters it uses), then prefetch;
* **forward post-hook** — release them, unless the recorded trace says a group is used again within
  ``stage3_max_reuse_distance`` elements and the live budget allows keeping it; with gradients enabled,
  hook the outputs so that their first gradient gathers the module again (*pre-backward*);
* **post-accumulate-grad hooks** — once every trainable parameter of a group has its gradient, the
  group is released (the gradient reducer reduce-scatters it in its own hook);
* **end of backward** (called by the engine) — release whatever is still gathered.

Prefetch follows the order of gathers recorded on the first iteration (one trace for training
iterations, one for ``no_grad`` forwards): after each gather, the next groups of the trace are
launched while the current module computes, up to ``stage3_prefetch_bucket_size`` elements ahead
(at least one group) and never beyond ``stage3_max_live_parameters`` resident elements. When an
iteration departs from its trace, prefetching stops and the trace is recorded again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from deepshard.zero.rows import OWNERS
from deepshard.zero.shard_group import ShardGroup
from deepshard.zero.units import external_parameters, reachable_params


class _Trace:
    """Order of group gathers in one kind of iteration, recorded once, then followed."""

    def __init__(self) -> None:
        self.order: list[int] = []
        self.complete = False
        self.pos = 0
        self.valid = True

    def start(self) -> None:
        self.pos = 0
        self.valid = True
        if not self.complete:
            self.order = []

    def see(self, index: int) -> None:
        if not self.complete:
            self.order.append(index)
        elif self.valid:
            if self.pos < len(self.order) and self.order[self.pos] == index:
                self.pos += 1
            else:
                self.valid = False

    def end(self) -> None:
        if not self.complete:
            self.complete = True
        elif not self.valid:  # this iteration differed: record the next one afresh
            self.complete = False


class Stage3Runtime:
    """Gathers, releases and prefetches the ZeRO-3 groups of one model."""

    def __init__(
        self,
        model: nn.Module,
        units: Sequence[tuple[str, nn.Module]],
        groups: Sequence[ShardGroup | None],
        prefetch_numel: int,
        max_live_numel: int,
        max_reuse_distance: int,
    ) -> None:
        self.model = model
        self.groups = [g for g in groups if g is not None]
        self.owner: dict[int, ShardGroup] = {id(p): g for g in self.groups for p in g.params}
        self._by_index = {g.index: g for g in self.groups}
        self.prefetch_numel = prefetch_numel
        self.max_live = max_live_numel
        self.max_reuse = max_reuse_distance
        self._static_needs: dict[int, list[ShardGroup]] = {}
        self._modules = [m for _, m in units]
        self.module_names = {id(m): name for name, m in units}
        self.unit_names = {g.index: g.name for g in self.groups}
        unit_ids = {id(m) for m in self._modules}
        for module in self._modules:
            self._static_needs[id(module)] = self._owners(reachable_params(module, unit_ids - {id(module)}))
        self._in_use: dict[int, int] = {}  # group index -> modules (or contexts) using it now
        self._traces = {True: _Trace(), False: _Trace()}
        self._trace = self._traces[True]
        self._active = False  # inside an iteration (root forward started, backward not finished)
        self._free: list[torch.Tensor] = []
        sizes = sorted(g.gather_numel for g in self.groups)
        self._typical_gather = sizes[len(sizes) // 2] if sizes else 0
        self._pending: dict[int, int] = {}  # group index -> trainable params still without a gradient
        self._trainable = {g.index: g.trainable for g in self.groups}
        self._handles: list[Any] = []
        for module in self._modules:
            self._handles.append(module.register_forward_pre_hook(self._pre_forward))
            self._handles.append(module.register_forward_hook(self._post_forward))
        for g in self.groups:
            for p in g.params:
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._on_grad))
        self._names = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in self.owner:
                self._names[name] = p
        def state_dict_hook(module: nn.Module, state: dict[str, Any], prefix: str, meta: Any) -> None:
            self._state_dict_hook(module, state, prefix, meta)

        self._handles.append(model.register_state_dict_post_hook(state_dict_hook))
        for g in self.groups:
            g.runtime = self
            for p in g.params:
                OWNERS.set(p, g)
        self.partition: Any = None  # the ZeroPartition, set once built (for GatheredParameters' updates)
        self.peak_live_numel = 0
        self.gathers = 0  # gathers launched (one per group and pass; counted for tests and benchmarks)

    def named_sharded(self) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every sharded parameter, tied ones under each of their names."""
        return list(self._names.items())

    def _state_dict_hook(self, module: nn.Module, state: dict[str, Any], prefix: str, meta: Any) -> None:
        """Sharded parameters appear as this rank's rows, unless gathered (then whole)."""
        for name, p in self._names.items():
            key = prefix + name
            g = self.owner[id(p)]
            if key in state and not g.unsharded:
                state[key] = g.shard_of(p).detach()

    # ------------------------------------------------------------------ bookkeeping
    def _owners(self, params: Sequence[nn.Parameter]) -> list[ShardGroup]:
        out: list[ShardGroup] = []
        for p in params:
            g = self.owner.get(id(p))
            if g is not None and g not in out:
                out.append(g)
        return out

    def needs(self, module: nn.Module) -> list[ShardGroup]:
        """Groups ``module``'s forward uses: its own, tied parameters' owners, external parameters' owners."""
        groups = list(self._static_needs.get(id(module), []))
        for g in self._owners(external_parameters(module)):
            if g not in groups:
                groups.append(g)
        return groups

    def live_numel(self) -> int:
        """Elements of groups whose whole values are resident or being gathered."""
        return sum(g.numel for g in self.groups if g.unsharded or g.gathering)

    def resident_groups(self) -> list[ShardGroup]:
        """Groups whose full storage holds values now (measured on the storage)."""
        return [g for g in self.groups if g.holds_values()]

    # ------------------------------------------------------------------ buffers
    def _take(self, group: ShardGroup) -> torch.Tensor:
        n = group.gather_numel
        for i, buf in enumerate(self._free):
            if buf.dtype == group.dtype and buf.device == group.device and n <= buf.numel() <= 2 * n:
                return self._free.pop(i)[:n]
        return torch.empty(n, dtype=group.dtype, device=group.device)

    def _give(self, buf: torch.Tensor) -> None:
        """Keep a finished gather buffer for reuse: at most three, none above twice the typical group
        (an embedding-sized root buffer is dropped, so the pool stays bounded by the block size)."""
        base = buf if buf._base is None else buf._base
        if len(self._free) < 3 and base.numel() <= 2 * self._typical_gather:
            self._free.append(base)

    # ------------------------------------------------------------------ gather / release
    def _launch(self, group: ShardGroup, what: str) -> None:
        swap = group.swap
        if swap is not None and not group.segment_resident:
            # NVMe shards: every staging buffer may hold a prefetched read; land the oldest to free one
            while not swap.can_take():
                reading = [g for g in self.groups if g.reading]
                if not reading:
                    break
                reading[0].finish_gather(what)
        self.gathers += 1
        group.start_gather(None if group.shared is not None else self._take(group), self._give, what)

    def fetch(self, groups: Sequence[ShardGroup], what: str) -> None:
        """Make ``groups`` resident now, counting them in use."""
        for g in groups:
            if not g.unsharded and not g.gathering:
                self._make_room(g.numel)
                self._launch(g, what)
        for g in groups:
            g.finish_gather(what)
            self._in_use[g.index] = self._in_use.get(g.index, 0) + 1
        self.peak_live_numel = max(self.peak_live_numel, self.live_numel())

    def _make_room(self, numel: int) -> None:
        """Release resident groups nobody uses until ``numel`` more fits the live budget (if it can)."""
        if self.live_numel() + numel <= self.max_live:
            return
        for g in self.groups:
            if g.unsharded and not self._in_use.get(g.index):
                g.release()
                if self.live_numel() + numel <= self.max_live:
                    return

    def unuse(self, groups: Sequence[ShardGroup], keep: bool) -> None:
        """Drop one use of each group; release those unused (``keep``: unless reused soon)."""
        for g in groups:
            count = self._in_use.get(g.index, 0) - 1
            self._in_use[g.index] = max(count, 0)
            if count <= 0 and not (keep and self._reused_soon(g)):
                g.release()

    def _reused_soon(self, group: ShardGroup) -> bool:
        trace = self._trace
        if not (trace.complete and trace.valid) or self.live_numel() > self.max_live:
            return False
        distance = 0
        for index in trace.order[trace.pos :]:
            if index == group.index:
                return distance <= self.max_reuse
            distance += self._by_index[index].numel
            if distance > self.max_reuse:
                return False
        return False

    def _prefetch(self, what: str) -> None:
        trace = self._trace
        if not (trace.complete and trace.valid) or self.prefetch_numel <= 0:
            return
        ahead = 0
        live = self.live_numel()
        for index in trace.order[trace.pos :]:
            g = self._by_index[index]
            if g.unsharded or g.gathering:
                continue
            if ahead > 0 and ahead + g.numel > self.prefetch_numel:
                return
            if live + g.numel > self.max_live:
                return
            if g.swap is not None and not g.segment_resident and not g.swap.can_take():
                return  # every NVMe staging buffer is busy: prefetch no further
            self._launch(g, f"prefetch after {what}")
            ahead += g.numel
            live += g.numel

    def release_all(self) -> None:
        """Release every group not held by a gather context (after backward, after a step)."""
        for g in self.groups:
            if not self._in_use.get(g.index):
                g.release()

    # ------------------------------------------------------------------ hooks
    def _pre_forward(self, module: nn.Module, args: Any) -> None:
        if module is self.model:  # a new iteration (the previous one ended, or never had a backward)
            self.end_iteration()
            self._begin_iteration()
        self._arrive(module, "forward")

    def _arrive(self, module: nn.Module, kind: str) -> list[ShardGroup]:
        """``module`` is about to run (``kind``: forward or backward): follow the trace, gather, prefetch."""
        groups = self.needs(module)
        for g in groups:
            self._trace.see(g.index)
        what = f"{kind} of {self.module_names.get(id(module), type(module).__name__)}"
        self.fetch(groups, what)
        self._prefetch(what)
        return groups

    def _post_forward(self, module: nn.Module, args: Any, output: Any) -> Any:
        groups = self.needs(module)
        training = torch.is_grad_enabled()
        self.unuse(groups, keep=training)
        if training:
            tensors = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
            if tensors:
                torch.autograd.graph.register_multi_grad_hook(
                    tensors, lambda grads: self._pre_backward(module), mode="any"
                )
        elif module is self.model:
            self.end_iteration()
        return None

    def _begin_iteration(self) -> None:
        self.release_all()
        self._trace = self._traces[torch.is_grad_enabled()]
        self._trace.start()
        self._active = True
        self._pending = dict(self._trainable)

    def _pre_backward(self, module: nn.Module) -> None:
        groups = self._arrive(module, "backward")
        # in use until their gradients arrive (released by _on_grad) or backward ends
        for g in groups:
            self._in_use[g.index] = max(self._in_use.get(g.index, 1) - 1, 0)

    def _on_grad(self, param: torch.Tensor) -> None:
        g = self.owner[id(param)]
        left = self._pending.get(g.index, 0) - 1
        self._pending[g.index] = left
        if left == 0 and not self._in_use.get(g.index):
            g.release()

    def end_iteration(self) -> None:
        """End of backward (or of a no-grad forward): release everything, close the trace."""
        if self._active:
            self._trace.end()
        self._active = False
        self.release_all()

    def remove_hooks(self) -> None:
        """Detach from the model."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
