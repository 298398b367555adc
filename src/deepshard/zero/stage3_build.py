"""Compose ZeRO stage 3 for one model: units, shard groups, persistent parameters, reducer, masters.

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
from typing import Any

import torch

from deepshard import comm
from deepshard.comm.host_shm import align_up, release_freed_heap, shared_storage
from deepshard.zero.grad_reduce import ReduceScatterGradReducer, ReduceSpec
from deepshard.zero.layout import BucketLayout, ShardSpec
from deepshard.zero.offload_build import check_space, master_numels, optimizer_offload, param_swap, tier_of
from deepshard.zero.param_gather import ParamGatherer
from deepshard.zero.partition import ZeroPartition, offload_master_args
from deepshard.zero.shard_group import LOCAL_ROWS, ShardGroup
from deepshard.zero.shared_params import SharedParameters
from deepshard.zero.stage import ZeroStage
from deepshard.zero.stage3 import Stage3Runtime
from deepshard.zero.units import plan_units
from deepshard.zero.watchdog import watchdog_timeout

_GROUPS: dict[tuple[int, float, str], Any] = {}
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
    world_id = id(torch.distributed.distributed_c10d._get_default_group())
    out = []
    for kind in ("gather", "check"):
        key = (world_id, timeout.total_seconds(), kind)
        if key not in _GROUPS:
            _GROUPS[key] = comm.new_group(timeout=timeout)
        out.append(_GROUPS[key])
    return out[0], out[1]


def build_stage3(
    stage: ZeroStage,
    module: torch.nn.Module,
    policy: Any,
    zero_cfg: Any,
    spec: ReduceSpec,
    rank: int,
    group: Any = None,
    aio: Any = None,
) -> ZeroPartition:
    """The stage-3 partition of ``module`` on this rank (collective)."""
    world = spec.world_size
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
            if small and not hasattr(p, LOCAL_ROWS):
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
    buffers = _shared_buffers(members, world, group) if param_tier != "nvme" else [None] * len(members)
    segment_device = torch.device("cpu") if param_tier != "none" else None
    groups: list[ShardGroup | None] = [
        ShardGroup(
            name, index, sharded, rank, world, ag_group, _local_rows, check_group, buffers[index], segment_device, swap
        )
        if sharded
        else None
        for index, ((name, _), sharded) in enumerate(zip(plan.modules, members))
    ]
    shards_shared = any(b is not None for b in buffers)
    if shards_shared:
        torch.distributed.barrier(group=group)  # every rank's rows are in place before anyone gathers
    for g in groups:
        if g is not None:
            for p in g.params:
                if hasattr(p, LOCAL_ROWS):
                    delattr(p, LOCAL_ROWS)  # the group's segment holds the rows now

    # gradients: one bucket per unit in backward order (blocks reversed, the root last)
    buckets = [*reversed(unit_trainable[:-1]), unit_trainable[-1]]
    trainable = [p for b in buckets for p in b]
    sizes = [sum(p.numel() for p in b) for b in buckets if b]
    typical = int(statistics.median(sizes)) if sizes else 1
    reducer = ReduceScatterGradReducer(
        trainable, policy.grad_dtype, typical, spec, rank=rank, group=group,
        overlap=bool(zero_cfg.effective_overlap_comm), buckets=buckets,
    )

    persistent_trainable = [p for p in persistent if p.requires_grad]
    shared = SharedParameters.create(persistent_trainable, group) if world > 1 else None
    shards = {id(p): s for g in groups if g is not None for p, s in zip(g.params, g.shards)}
    masters_param_order = [p for p in trainable]
    from deepshard.precision import MasterWeights

    offload = optimizer_offload(
        zero_cfg,
        aio,
        master_numels(masters_param_order, rank, world, sharded=True, shards=shards),
        engine=swap.engine if swap is not None else None,
    )
    # offloaded shards cannot be the fp32 masters (they leave memory): masters are copies then, on the
    # model's device unless the optimizer is offloaded too
    master_args = offload_master_args(zero_cfg, offload)
    if param_tier != "none" and offload is None and masters_param_order:
        master_args = {"device": masters_param_order[0].device}
    masters = MasterWeights(
        masters_param_order,
        needs_fp32_copy=policy.needs_master or offload is not None or param_tier != "none",
        row_range=lambda p: ShardSpec(p.shape, world).row_range(rank),
        shards=shards,
        **master_args,
    )
    if offload is not None:
        offload.attach(masters)
    masters.published_early = masters.published_early or swap is not None  # shards written via their tier
    in_cpu = int(zero_cfg.offload_param.max_in_cpu) if swap is not None else 0
    for g in groups:
        if g is not None:
            # NVMe parameter offload: the shards live on disk from now on, except the first units up to
            # offload_param.max_in_cpu elements, which stay in host memory
            g.keep_in_memory = g.layout.segment_numel <= in_cpu
            in_cpu -= g.layout.segment_numel if g.keep_in_memory else 0
            g.evict_segment()
    if swap is not None:
        swap.flush()
        swap.trim()
    gatherer = (
        ParamGatherer(persistent_trainable, rank, world, int(zero_cfg.allgather_bucket_size), group)
        if shared is None and persistent_trainable
        else None
    )
    given = zero_cfg.model_fields_set
    runtime = Stage3Runtime(
        module,
        plan.modules,
        groups,
        # absent keys: one unit ahead, release unless needed next (FSDP2's leanness; docs/config.md)
        prefetch_numel=int(zero_cfg.stage3_prefetch_bucket_size) if "stage3_prefetch_bucket_size" in given else 1,
        max_live_numel=int(zero_cfg.stage3_max_live_parameters),
        max_reuse_distance=int(zero_cfg.stage3_max_reuse_distance) if "stage3_max_reuse_distance" in given else 0,
    )
    release_freed_heap()  # the whole parameters just dropped
    partition = ZeroPartition(
        stage, rank, world, group, reducer, masters, gatherer, shared, stage3=runtime, shards_shared=shards_shared,
        offload=offload, param_tier=param_tier, param_swap=swap,
    )
    runtime.partition = partition
    return partition


def _shared_buffers(
    members: list[list[torch.nn.Parameter]], world: int, group: Any
) -> list[torch.Tensor | None]:
    """Each group's rank-major buffer in one host shared-memory mapping (collective), or ``None`` each."""
    layouts = [BucketLayout([p.shape for p in ps], world) if ps else None for ps in members]
    sizes = [
        align_up(lay.full_numel * ps[0].element_size(), _ALIGN) if lay is not None else 0
        for lay, ps in zip(layouts, members)
    ]
    usable = all(p.device.type == "cpu" for ps in members for p in ps)
    storage = shared_storage(group, sum(sizes), usable) if world > 1 else None
    if storage is None:
        return [None] * len(members)
    out: list[torch.Tensor | None] = []
    offset = 0
    for lay, ps, size in zip(layouts, members, sizes):
        if lay is None:
            out.append(None)
            continue
        nbytes = lay.full_numel * ps[0].element_size()
        out.append(storage[offset : offset + nbytes].view(ps[0].dtype))
        offset += size
    return out


def members_element_size(members: list[list[torch.nn.Parameter]]) -> int:
    """Bytes per element of the sharded parameters (one dtype per model)."""
    return next((ps[0].element_size() for ps in members if ps), 2)


def _local_rows(p: torch.nn.Parameter) -> torch.Tensor | None:
    rows: torch.Tensor | None = getattr(p, LOCAL_ROWS, None)
    return rows
