"""ZeRO-Offload's optimizer side: fp32 masters and optimizer state on the host or on NVMe, stepped in sub-groups.

The masters (this rank's rows, :class:`~deepshard.precision.MasterWeights`) are cut into
*sub-groups* of consecutive masters of at most ``sub_group_size`` elements (a master larger than that
is a sub-group of its own). The step runs the optimizer where the state lives, one sub-group at a
time: its masters get their gradients (cast to fp32 on the host), the optimizer steps them (every
other master has no gradient, so PyTorch's optimizers skip it), and the updated values are written
into the module's rows or ZeRO-3 shards straight away (*published early*), so that nothing needs the
masters again until the next step.

* ``cpu``: masters and state stay in host memory (page-locked when an accelerator copies them).
* ``nvme``: masters and state live in swap slots (:class:`~deepshard.offload.swap.SwapSpace`); in
  memory they are placeholders that hold no bytes. A sub-group's masters and state are read into a
  staging buffer, stepped there in place, and written back. With ``pipeline_read`` the next
  sub-group is read while this one steps; with ``pipeline_write`` the write of this one proceeds while
  the next steps. Masters are streamed to their slots as they are created, so the fp32 copy of the
  model is never whole in memory.

The optimizer's tensor state keys (``exp_avg``, ``exp_avg_sq``, ``momentum_buffer``, ...) are found by
stepping a probe copy of the optimizer on a tiny tensor; scalar state (``step``) stays in memory.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from deepshard.comm.bucketing import plan_buckets
from deepshard.offload.aio import align_up, check_nvme_path
from deepshard.offload.swap import PendingRead, Region, SwapSpace, region_offsets
from deepshard.precision.master import MasterWeights

logger = logging.getLogger("deepshard")
_F32 = 4
ADAM_LIKE_STATES = 2  # state tensors per element the up-front space check assumes


def placeholder(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """A tensor of ``shape`` that holds no bytes (one element broadcast; writes to it raise)."""
    one = torch.zeros(1, dtype=torch.float32, device=device)
    return one.expand(shape) if len(shape) else one.view(())


@dataclass
class SubGroup:
    """Consecutive masters stepped together."""

    index: int
    members: list[int]  # positions in MasterWeights.masters
    numels: list[int]
    stateful: list[bool] = field(default_factory=list)  # NVMe: member's optimizer state is in the slots
    slots_for_state: bool = False  # NVMe: the state slots exist
    resident: bool = True  # NVMe: masters (and state) hold real memory now
    holders: list[torch.Tensor] = field(default_factory=list)  # keeps installed memory alive

    @property
    def numel(self) -> int:
        return sum(self.numels)

    @property
    def has_state(self) -> bool:
        return any(self.stateful)


def staging_bytes(numel: int, regions: int) -> int:
    """Bytes of a staging buffer holding ``regions`` fp32 tensors of ``numel`` elements, each page-aligned."""
    return regions * align_up(numel * _F32)


def plan_sub_groups(numels: Sequence[int], sub_group_size: int) -> list[SubGroup]:
    """Cut masters of ``numels`` elements into consecutive sub-groups of at most ``sub_group_size``."""
    buckets = plan_buckets(numels, max(int(sub_group_size), 1))
    return [SubGroup(i, members, [numels[j] for j in members]) for i, members in enumerate(buckets)]


def probe_state_keys(optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's per-element state tensors, found by stepping a copy on a tiny tensor."""
    p = torch.nn.Parameter(torch.zeros(8))
    p.grad = torch.full((8,), 1e-3)
    hyper = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    try:
        factory: Any = type(optimizer)  # the concrete class takes the params (hyper-parameters in the group)
        probe = factory([{"params": [p], **hyper}])
        probe.step()
    except Exception as exc:  # noqa: BLE001 - any failure means we cannot learn the state layout
        raise ValueError(
            f"optimizer offload needs to learn the state layout of {type(optimizer).__name__} by stepping a copy "
            f"of it on a small tensor, which failed ({type(exc).__name__}: {exc}); use a torch.optim optimizer "
            "(AdamW, Adam, SGD, ...) or set offload_optimizer.device to 'none'."
        ) from exc
    return sorted(k for k, v in probe.state[p].items() if isinstance(v, torch.Tensor) and v.shape == p.shape)


class OffloadedOptimizer:
    """Steps the masters sub-group by sub-group on the host, with masters and state in host memory or on NVMe."""

    def __init__(
        self,
        numels: Sequence[int],
        tier: str,
        sub_group_size: int,
        swap: SwapSpace | None = None,
        pipeline_read: bool = False,
        pipeline_write: bool = False,
    ) -> None:
        """``numels``: elements of each master, in the order :class:`MasterWeights` makes them; hand
        :meth:`sink` to it as its ``sink``, then :meth:`attach` it."""
        if tier not in ("cpu", "nvme") or (tier == "nvme") != (swap is not None):
            raise ValueError(
                f"optimizer offload tier must be 'cpu' or 'nvme' (with swap space), got {tier!r}"
            )
        self.tier = tier
        self.swap = swap
        self.pipeline_read = pipeline_read
        self.pipeline_write = pipeline_write
        self.sub_groups = plan_sub_groups(numels, sub_group_size)
        self._where = {i: (sg, j) for sg in self.sub_groups for j, i in enumerate(sg.members)}
        self._filling: torch.Tensor | None = None
        self.state_keys: list[str] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self._masters: MasterWeights | None = None
        self._grads: torch.Tensor | None = None
        self.steps = 0
        if swap is not None:
            for sg in self.sub_groups:
                swap.slot(self._key(sg, "master"), sg.numel * _F32)

    @property
    def masters(self) -> MasterWeights:
        assert self._masters is not None, "attach() the masters first"
        return self._masters

    def sink(self, i: int, master: torch.Tensor) -> None:
        """Take master ``i`` as it is made: on NVMe, copy it into its sub-group's staging buffer, write the
        sub-group once complete, and leave a placeholder (so the fp32 model is never whole in memory)."""
        if self.swap is None:
            return
        sg, j = self._where[i]
        if self._filling is None:
            self._filling = self.swap.take(sg.numel * _F32)
        at = sum(sg.numels[:j])
        self._filling.view(torch.float32)[at : at + sg.numels[j]].copy_(master.detach().reshape(-1))
        master.data = placeholder(master.shape, master.device)
        if j == len(sg.members) - 1:
            self.swap.write(self._regions(sg, with_state=False), self._filling)
            self._filling = None
            sg.resident = False

    def attach(self, masters: MasterWeights) -> None:
        """Adopt the masters (made with :meth:`sink` and ``published_early=True``: every step writes them
        into the model itself)."""
        if len(masters.masters) != len(self._where):
            raise ValueError(f"offload planned {len(self._where)} masters, got {len(masters.masters)}")
        if not masters.published_early:
            raise ValueError(
                "offloaded masters are published by each step: build MasterWeights(published_early=True)"
            )
        self._masters = masters
        if self.swap is not None:
            self.swap.flush()

    # ------------------------------------------------------------------ layout
    @staticmethod
    def _key(sg: SubGroup, what: str) -> str:
        return f"sg{sg.index}.{what}"

    def _regions(self, sg: SubGroup, with_state: bool) -> list[Region]:
        kinds = ["master", *(self.state_keys if with_state else [])]
        return [(self._key(sg, k), sg.numel * _F32) for k in kinds]

    @staticmethod
    def buffer_bytes(numels: Sequence[int], sub_group_size: int, state_tensors: int) -> int:
        """Staging-buffer bytes the largest sub-group needs (master plus ``state_tensors`` per element)."""
        largest = max((sg.numel for sg in plan_sub_groups(numels, sub_group_size)), default=1)
        return staging_bytes(largest, 1 + state_tensors)

    def _views(
        self, sg: SubGroup, buffer: torch.Tensor, kinds: Sequence[str]
    ) -> dict[str, list[torch.Tensor]]:
        """Per kind (``master`` or a state key), views of ``buffer`` shaped like each member's master."""
        regions = [(k, sg.numel * _F32) for k in kinds]
        out: dict[str, list[torch.Tensor]] = {}
        for (kind, nbytes), at in zip(regions, region_offsets(regions)):
            flat = buffer[at : at + nbytes].view(torch.float32)
            views, offset = [], 0
            for i, n in zip(sg.members, sg.numels):
                views.append(flat[offset : offset + n].view(self.masters.masters[i].shape))
                offset += n
            out[kind] = views
        return out

    # ------------------------------------------------------------------ NVMe residency
    def _install(self, sg: SubGroup, buffer: torch.Tensor, with_state: bool) -> None:
        kinds = ["master", *(self.state_keys if with_state else [])]
        views = self._views(sg, buffer, kinds)
        assert self.optimizer is not None or not with_state
        for j, i in enumerate(sg.members):
            m = self.masters.masters[i]
            m.data = views["master"][j]
            if with_state and self.optimizer is not None and sg.stateful[j]:
                state = self.optimizer.state[m]
                for key in self.state_keys:
                    state[key] = views[key][j]
        sg.holders = [buffer]
        sg.resident = True

    def _evict(self, sg: SubGroup, buffer: torch.Tensor | None) -> None:
        """Write ``sg``'s masters and state to their slots (from ``buffer`` if installed there) and drop them."""
        assert self.swap is not None
        masters = [self.masters.masters[i] for i in sg.members]
        optimizer = self.optimizer
        stateful = [
            optimizer is not None
            and bool(self.state_keys)
            and all(isinstance(optimizer.state.get(m, {}).get(k), torch.Tensor) for k in self.state_keys)
            for m in masters
        ]
        with_state = any(stateful)
        if with_state and not sg.slots_for_state:
            for key in self.state_keys:
                self.swap.slot(self._key(sg, key), sg.numel * _F32)
            sg.slots_for_state = True
        kinds = ["master", *(self.state_keys if with_state else [])]
        staging = self.swap.take(staging_bytes(sg.numel, len(kinds))) if buffer is None else buffer
        views = self._views(sg, staging, kinds)
        dst, src = [], []
        for j, m in enumerate(masters):
            if m.data_ptr() != views["master"][j].data_ptr():
                dst.append(views["master"][j])
                src.append(m.detach())
            if stateful[j]:
                assert optimizer is not None
                state = optimizer.state[m]
                for key in self.state_keys:
                    if state[key].data_ptr() != views[key][j].data_ptr():
                        dst.append(views[key][j])
                        src.append(state[key])
        if dst:
            torch._foreach_copy_(dst, src)
        for j, m in enumerate(masters):
            m.data = placeholder(m.shape, m.device)
            if stateful[j]:
                assert optimizer is not None
                state = optimizer.state[m]
                for key in self.state_keys:
                    state[key] = placeholder(m.shape, m.device)
        self.swap.write(self._regions(sg, with_state), staging)
        sg.stateful = stateful
        sg.resident = False
        sg.holders = []

    def _read(self, sg: SubGroup) -> PendingRead:
        assert self.swap is not None
        return self.swap.read(self._regions(sg, sg.has_state))

    # ------------------------------------------------------------------ binding and the step
    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Adopt the optimizer built over the masters; learn its state layout (NVMe)."""
        self.optimizer = optimizer
        if self.swap is not None:
            self.state_keys = probe_state_keys(optimizer)
            extra = len(self.state_keys) - ADAM_LIKE_STATES
            if extra > 0:  # more state than the up-front space check assumed: check the rest now
                check_nvme_path(
                    self.swap.files.dir,
                    extra * 4 * sum(sg.numel for sg in self.sub_groups),
                    "optimizer state",
                )
            largest = max((sg.numel for sg in self.sub_groups), default=1)
            needed = staging_bytes(largest, 1 + len(self.state_keys))
            if needed > self.swap.buffer_bytes:
                self.swap.trim()
                self.swap.buffer_bytes = needed

    def step(
        self,
        grads: dict[int, torch.Tensor],
        publish: Callable[[list[int]], None],
    ) -> None:
        """One optimizer step over every sub-group; ``publish(members)`` writes updated masters into the model."""
        optimizer = self.optimizer
        assert optimizer is not None, "bind() the optimizer first"
        reads: dict[int, PendingRead] = {}
        order = self.sub_groups
        for pos, sg in enumerate(order):
            buffer = None
            if self.swap is not None and not sg.resident:
                if sg.index not in reads:
                    reads[sg.index] = self._read(sg)
                if self.pipeline_read and pos + 1 < len(order) and not order[pos + 1].resident:
                    nxt = order[pos + 1]
                    reads.setdefault(nxt.index, self._read(nxt))
                buffer = reads.pop(sg.index).wait()
                self._install(sg, buffer, with_state=sg.has_state)
            self.masters.attach_grads(grads, sg.members, out=self._grad_buffer(sg))
            optimizer.step()
            self.masters.release_grads(sg.members)
            publish(sg.members)
            if self.swap is not None:
                self._evict(sg, buffer)
                if not self.pipeline_write:
                    self.swap.flush()
        if self.swap is not None:
            self.swap.flush()  # the next step reads these slots again
        self.steps += 1

    def _grad_buffer(self, sg: SubGroup) -> torch.Tensor:
        """One fp32 buffer, reused by every sub-group, for gradients cast to fp32 on the host."""
        if self._grads is None:
            device = self.masters.masters[0].device if self.masters.masters else torch.device("cpu")
            self._grads = torch.empty(
                max(g.numel for g in self.sub_groups), dtype=torch.float32, device=device
            )
        return self._grads[: sg.numel]

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        """Make every master and its state real tensors in memory (checkpoints, loads); write them back after."""
        if self.swap is None:
            yield
            return
        for sg in self.sub_groups:
            if sg.resident:
                continue
            buffer = self._read(sg).wait()
            kinds = ["master", *(self.state_keys if sg.has_state else [])]
            views = self._views(sg, buffer, kinds)
            for j, i in enumerate(sg.members):
                m = self.masters.masters[i]
                m.data = views["master"][j].clone()
                if sg.has_state and self.optimizer is not None and sg.stateful[j]:
                    state = self.optimizer.state[m]
                    for key in self.state_keys:
                        state[key] = views[key][j].clone()
            self.swap.give(buffer)
            sg.resident = True
        try:
            yield
        finally:
            for sg in self.sub_groups:
                if sg.resident:
                    self._evict(sg, None)
            self.swap.flush()
            self.swap.trim()

    # ------------------------------------------------------------------ accounting
    def resident_bytes(self) -> tuple[int, int]:
        """Host bytes the masters and the optimizer state hold in memory now (placeholders count ~0)."""
        seen: set[int] = set()

        def size(t: torch.Tensor) -> int:
            storage = t.untyped_storage()
            if storage.data_ptr() in seen:
                return 0
            seen.add(storage.data_ptr())
            return int(storage.nbytes())

        masters = sum(size(m) for m in self.masters.masters)
        state = 0
        if self.optimizer is not None:
            for values in self.optimizer.state.values():
                state += sum(size(v) for v in values.values() if isinstance(v, torch.Tensor))
        return masters, state

    def stored_bytes(self) -> tuple[int, int]:
        """Bytes of masters and of optimizer state on the NVMe tier."""
        if self.swap is None:
            return 0, 0
        masters = sum(sg.numel * _F32 for sg in self.sub_groups)
        state = sum(sg.numel * _F32 * len(self.state_keys) for sg in self.sub_groups if sg.slots_for_state)
        return masters, state

    def close(self) -> None:
        """Remove the swap files."""
        if self.swap is not None:
            self.swap.close()
