"""Stage 3's step of the one ZeRO composition (:func:`deepshard.zero.partition.build_partition`):
units, shard groups and persistent parameters; the builder adds reducer, masters and offload.

* Units come from :func:`deepshard.zero.units.plan_units`; each unit's parameters of at least
  ``stage3_param_persistence_threshold`` elements form its :class:`ShardGroup` (one all-gather).
  Smaller ones stay whole on every rank (*persistent*, up to ``stage3_model_persistence_threshold``
  elements in all) and are treated as at stage 2: sharded gradient and optimizer state, updated rows
  made whole after the step (shared memory on one host, else an all-gather).
* Gradients: one reduce-scatter bucket per unit, ordered as backward produces them (blocks in
  reverse, the root last, whose embedding gradient arrives at the very end).
* Masters: this rank's rows, read from the group shards (fp32 masters *are* the shard rows).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

import torch

from deepshard import comm
from deepshard.comm.host_shm import release_freed_heap, shared_regions
from deepshard.offload.swap import SwapSpace
from deepshard.zero.layout import BucketLayout
from deepshard.zero.offload_build import check_space, master_numels, param_swap, tier_of
from deepshard.zero.rows import RowRegistry
from deepshard.zero.shard_group import ShardGroup
from deepshard.zero.stage3 import Stage3Runtime
from deepshard.zero.units import plan_units
from deepshard.zero.watchdog import watchdog_timeout

_GROUPS: dict[tuple[int | None, float, str], Any] = {}
_ALIGN = 64  # bytes between groups in the shared mapping


def stage3_groups(group: Any) -> tuple[Any, Any]:
    """The process groups of stage-3 gathers and of their pre-gather check, with the watchdog's timeout.

    They are apart from gradient traffic, so that gathers and reductions never match each other.
    Without a default group (one process) both are ``None``; a model-parallel data group keeps its own
    settings and is used for both (its checks then share its timeout).
    """
    if not comm.is_initialized() or comm.get_world_size(group) == 1:
        return group, None
    if group is not None:
        return group, group
    timeout = watchdog_timeout()
    world_id = comm.world_id()
    out = []
    for kind in ("gather", "check"):
        key = (world_id, timeout.total_seconds(), kind)
        if key not in _GROUPS:
            _GROUPS[key] = comm.new_group(timeout=timeout)
        out.append(_GROUPS[key])
    return out[0], out[1]


@dataclass
class Stage3Units:
    """Stage 3's step of the composition: the units' shard groups and the parameters that stay whole."""

    plan: Any  # the units (deepshard.zero.units.UnitPlan)
    groups: list[ShardGroup | None]  # one per unit; ``None`` where a unit keeps nothing sharded
    persistent: list[torch.nn.Parameter]  # under the persistence threshold: whole on every rank
    buckets: list[list[torch.nn.Parameter]]  # trainable parameters per unit, in backward order
    param_tier: str  # offload_param.device
    swap: SwapSpace | None  # offload_param nvme: the shards' swap space
    shards_shared: bool  # every rank's shards in one host shared mapping

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        """Every trainable parameter, in the reducer's bucket order (the masters' order too)."""
        return [p for b in self.buckets for p in b]

    @property
    def shards(self) -> dict[int, torch.Tensor]:
        """``id(param) -> this rank's shard`` of every sharded parameter."""
        return {id(p): s for g in self.groups if g is not None for p, s in zip(g.params, g.shards)}

    def typical_bucket(self) -> int:
        """The median unit's trainable elements (the reducer's nominal bucket size)."""
        sizes = [sum(p.numel() for p in b) for b in self.buckets if b]
        return int(statistics.median(sizes)) if sizes else 1


def shard_units(
    module: torch.nn.Module, zero_cfg: Any, rank: int, world: int, group: Any, aio: Any, rows: RowRegistry
) -> Stage3Units:
    """Cut ``module`` into units and build each unit's :class:`ShardGroup` on this rank (collective).

    Checks the NVMe space for shards and masters before anything is written. Rows that ``zero.Init``
    left in ``rows`` are adopted by their group's segment (and dropped from the registry).
    """
    plan = plan_units(module)
    threshold = int(zero_cfg.stage3_param_persistence_threshold)
    budget = int(zero_cfg.stage3_model_persistence_threshold)
    ag_group, check_group = stage3_groups(group)

    persistent: list[torch.nn.Parameter] = []
    unit_trainable: list[list[torch.nn.Parameter]] = []
    members: list[list[torch.nn.Parameter]] = []
    kept = 0
    for params in plan.params:
        sharded = []
        for p in params:
            small = p.numel() < threshold and kept + p.numel() <= budget
            if small and p not in rows:
                persistent.append(p)
                kept += p.numel()
            else:
                sharded.append(p)
        members.append(sharded)
        unit_trainable.append([p for p in params if p.requires_grad])
    param_tier = tier_of(zero_cfg.offload_param)
    segment_numels = [BucketLayout([p.shape for p in ps], world).segment_numel for ps in members if ps]
    segment_bytes = [n * members_element_size(members) for n in segment_numels]
    persistent_rows = master_numels([p for p in persistent if p.requires_grad], rank, world, sharded=True)
    check_space(zero_cfg, sum(segment_bytes), sum(segment_numels) + sum(persistent_rows))
    swap = param_swap(zero_cfg, aio, segment_bytes)
    # NVMe-offloaded shards must leave memory, so they are not placed in the host's shared mapping
    buffers = (
        _shared_buffers(members, world, group, bool(zero_cfg.host_shared_memory))
        if param_tier != "nvme"
        else [None] * len(members)
    )
    segment_device = torch.device("cpu") if param_tier != "none" else None
    groups: list[ShardGroup | None] = [
        ShardGroup(
            name,
            index,
            sharded,
            rank,
            world,
            ag_group,
            rows.get,
            check_group,
            buffers[index],
            segment_device,
            swap,
        )
        if sharded
        else None
        for index, ((name, _), sharded) in enumerate(zip(plan.modules, members))
    ]
    shards_shared = any(b is not None for b in buffers)
    if shards_shared:
        comm.barrier(group=group)  # every rank's rows are in place before anyone gathers
    for g in groups:
        if g is not None:
            for p in g.params:
                rows.pop(p)  # the group's segment holds the rows now
    # gradients: one bucket per unit in backward order (blocks reversed, the root last)
    buckets = [*reversed(unit_trainable[:-1]), unit_trainable[-1]]
    return Stage3Units(plan, groups, persistent, buckets, param_tier, swap, shards_shared)


def evict_units(units: Stage3Units, zero_cfg: Any) -> None:
    """Once the masters exist: NVMe parameter offload moves the shards to disk from now on, except the
    first units up to ``offload_param.max_in_cpu`` elements, which stay in host memory."""
    in_cpu = int(zero_cfg.offload_param.max_in_cpu) if units.swap is not None else 0
    for g in units.groups:
        if g is not None:
            g.keep_in_memory = g.layout.segment_numel <= in_cpu
            in_cpu -= g.layout.segment_numel if g.keep_in_memory else 0
            g.evict_segment()
    if units.swap is not None:
        units.swap.flush()
        units.swap.trim()


def stage3_runtime(module: torch.nn.Module, units: Stage3Units, zero_cfg: Any) -> Stage3Runtime:
    """The hooks that gather, release and prefetch the units' groups around forward and backward."""
    given = zero_cfg.model_fields_set
    runtime = Stage3Runtime(
        module,
        units.plan.modules,
        units.groups,
        # absent keys: one unit ahead, release unless needed next (FSDP2's leanness; docs/config.md)
        prefetch_numel=int(zero_cfg.stage3_prefetch_bucket_size)
        if "stage3_prefetch_bucket_size" in given
        else 1,
        max_live_numel=int(zero_cfg.stage3_max_live_parameters),
        max_reuse_distance=int(zero_cfg.stage3_max_reuse_distance)
        if "stage3_max_reuse_distance" in given
        else 0,
    )
    release_freed_heap()  # the whole parameters just dropped
    return runtime


def _shared_buffers(
    members: list[list[torch.nn.Parameter]], world: int, group: Any, configured: bool
) -> list[torch.Tensor | None]:
    """Each group's rank-major buffer in one host shared-memory mapping (collective), or ``None`` each."""
    nbytes = [
        BucketLayout([p.shape for p in ps], world).full_numel * ps[0].element_size() if ps else 0
        for ps in members
    ]
    usable = all(p.device.type == "cpu" for ps in members for p in ps)
    regions = shared_regions(group, nbytes, usable, _ALIGN, configured) if world > 1 else None
    if regions is None:
        return [None] * len(members)
    return [r.view(ps[0].dtype) if ps else None for r, ps in zip(regions, members)]


def members_element_size(members: list[list[torch.nn.Parameter]]) -> int:
    """Bytes per element of the sharded parameters (one dtype per model)."""
    return next((ps[0].element_size() for ps in members if ps), 2)
