"""Compose the ZeRO mechanism for one stage: gradient reducer, master weights, parameter gatherer.

The engine asks this module for three things and never branches on the stage itself:
``reduced_grads()`` (what the optimizer's masters get as gradients), ``global_norm()`` (exact across
shards), and ``publish()`` (make the updated parameters whole on every rank).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from deepshard import comm
from deepshard.offload.swap import SwapSpace
from deepshard.precision import MasterWeights, PrecisionPolicy
from deepshard.zero.grad_reduce import (
    AllReduceGradReducer,
    ReduceScatterGradReducer,
    ReduceSpec,
    unique_trainable,
)
from deepshard.zero.layout import ShardSpec
from deepshard.zero.offload_build import check_space, master_numels, optimizer_offload
from deepshard.zero.offload_optimizer import OffloadedOptimizer
from deepshard.zero.param_gather import ParamGatherer
from deepshard.zero.rows import LOCAL_ROWS
from deepshard.zero.shared_grads import SharedRowReducer, try_shared_row_reducer
from deepshard.zero.shared_params import SharedParameters
from deepshard.zero.stage import ZeroStage
from deepshard.zero.stage3 import Stage3Runtime
from deepshard.zero.stage3_build import Stage3Units, evict_units, shard_units, stage3_runtime

Reducer = AllReduceGradReducer | ReduceScatterGradReducer | SharedRowReducer

STAGE0_DEFAULT_BUCKET_BYTES = 25 * 2**20


NORM_CHUNK = 1 << 16
"""Elements per partial norm on CPU. The CPU norm kernel accumulates each vector lane sequentially in
the input's precision, so its relative error grows with the length and is always low: measured on one
50M-element fp32 buffer, -3.9e-3. Cut into 65536-element views accumulated in float64 (each view is
up-cast in cache, the buffer is never copied whole) it is 4e-13, at 2.5x the time of the plain kernel
(18 ms for 50M elements here). CUDA's kernel reduces as a tree and takes whole buffers."""


def sum_of_squares(flats: list[torch.Tensor]) -> torch.Tensor:
    """``sum(||t||**2)`` over ``flats`` as a 0-d fp32 tensor, without copying the buffers.

    On CPU, each buffer is accumulated in float64 per :data:`NORM_CHUNK`-element view. On CUDA, fp16
    buffers are up-cast per element (a scaled fp16 norm easily exceeds fp16's range) and bf16/fp32 ones
    accumulate in fp32 natively (a bf16 result carries bf16's ~1e-3 relative precision, plenty for
    clipping and overflow checks).
    """
    if not flats:
        return torch.zeros((), dtype=torch.float32)
    if flats[0].device.type == "cpu":
        pieces = [piece for flat in flats for piece in flat.split(NORM_CHUNK)]
        norms = torch._foreach_norm(pieces, 2.0, dtype=torch.float64)
        return torch.stack(list(norms)).square().sum().float()
    upcast = torch.float32 if flats[0].dtype == torch.float16 else None
    norms = torch._foreach_norm(flats, 2.0, dtype=upcast)
    return torch.stack([n.float() for n in norms]).square().sum()


@dataclass
class ZeroPartition:
    """The pieces one stage uses on this rank."""

    stage: ZeroStage
    rank: int
    world: int
    group: Any
    reducer: Reducer
    masters: MasterWeights
    gatherer: ParamGatherer | None
    shared: SharedParameters | None = None
    optimizer: torch.optim.Optimizer | None = None  # set by the engine once built (fragment API)
    stage3: Stage3Runtime | None = None
    shards_shared: bool = False  # stage 3 on one host: every rank's shards in one shared mapping
    offload: OffloadedOptimizer | None = None  # masters and optimizer state on the host or NVMe
    param_tier: str = "none"  # stage 3: where parameter shards live between uses
    param_swap: SwapSpace | None = None  # stage 3, offload_param nvme: the shards' swap space
    rows_fresh: bool = False  # offload: the step already wrote the updated masters into the model

    # ------------------------------------------------------------------ the optimizer step
    def bind_optimizer(self, optimizer: torch.optim.Optimizer | None) -> None:
        """The engine built the optimizer over the masters (an offload tier learns its state layout)."""
        self.optimizer = optimizer
        if self.offload is not None and optimizer is not None:
            self.offload.bind(optimizer)

    def step_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Give the masters their reduced gradients and step them: at once, or sub-group by sub-group
        where the state lives (offload), each sub-group's updates written into the model right away."""
        grads = self.reduced_grads()
        if self.offload is None:
            self.masters.attach_grads(grads)
            optimizer.step()
            self.masters.release_grads()
            return
        self.offload.step(grads, self._publish_rows)
        self.rows_fresh = True

    def _publish_rows(self, members: list[int]) -> None:
        """Write updated masters into the model; NVMe-offloaded shards are made writable, then written back."""
        if self.param_swap is None:
            self.masters.publish_rows(members)
            return
        stage3 = self.stage3
        assert stage3 is not None

        def before(p: torch.Tensor) -> None:
            if id(p) in stage3.owner:
                stage3.owner[id(p)].begin_publish()

        def after(p: torch.Tensor) -> None:
            if id(p) in stage3.owner:
                stage3.owner[id(p)].member_published()

        self.masters.publish_rows(members, before, after)

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        """Everything this rank holds as real tensors in memory (checkpoints, GatheredParameters'
        updates): offloaded masters, optimizer state and parameter shards are read in, written back after."""
        if self.offload is None and self.param_swap is None:
            yield
            return
        groups = self.stage3.groups if self.stage3 is not None and self.param_swap is not None else []
        for g in groups:
            g.load_segment()
        try:
            with self.offload.resident() if self.offload is not None else contextlib.nullcontext():
                yield
        finally:
            for g in groups:
                g.evict_segment()
            if self.param_swap is not None:
                self.param_swap.flush()
                self.param_swap.trim()

    def close(self) -> None:
        """Remove offload swap files (the engine is being torn down)."""
        if self.offload is not None:
            self.offload.close()
        if self.param_swap is not None:
            self.param_swap.close()

    def reduced_grads(self) -> dict[int, torch.Tensor]:
        """``id(param) -> reduced gradient``: whole (stages 0-1) or this rank's shard (stage 2)."""
        return self.reducer.optimizer_grads()

    def global_norm(self) -> float:
        """L2 norm of all reduced gradients; one tiny all-reduce when they are sharded.

        See :func:`sum_of_squares` for the precision.
        """
        sumsq = sum_of_squares(self.reducer.flat_grads())
        if self.reducer.sharded_result and self.world > 1:
            comm.all_reduce(sumsq, group=self.group)
        return float(sumsq.sqrt())

    def unscale_and_clip(self, factor: float) -> None:
        """Multiply every reduced gradient by ``factor`` (one multi-tensor op)."""
        if factor != 1.0:
            torch._foreach_mul_(self.reducer.flat_grads(), factor)

    def begin_update(self) -> None:
        """Before masters or parameters are written (step, fragment setters, loads); collective when shared."""
        if self.shared is not None:
            self.shared.begin_update()
        elif self.shards_shared:
            comm.barrier(group=self.group)

    def fence(self) -> None:
        """After rows were written outside a step (loads, GatheredParameters): make them visible to all ranks."""
        if self.shared is not None or self.shards_shared:
            comm.barrier(group=self.group)

    def publish(self) -> None:
        """After the optimizer step: make the updated parameters whole in the module on every rank.

        At stage 3 the masters go into the shards (cast when they are copies) and resident whole
        values are dropped; only parameters under the persistence threshold are made whole.
        """
        if self.offload is not None or self.param_swap is not None:
            if not self.rows_fresh:  # masters set outside a step (loads, fragment setters): write them now
                self._publish_rows(list(range(len(self.masters.masters))))
            self.rows_fresh = False
        if self.stage3 is not None:
            self.masters.copy_to_shards()
            self.stage3.release_all()
        if self.shared is not None:
            self.shared.finish_update(self.masters)
        elif self.gatherer is not None:
            self.gatherer.gather(self.masters)
        elif self.stage3 is None:
            self.masters.copy_to_model()
        if self.param_swap is not None:
            self.param_swap.flush()  # the next gathers read these slots
        if self.shards_shared and self.shared is None:
            comm.barrier(group=self.group)  # every rank's updated rows written before anyone gathers

    def after_backward(self) -> None:
        """End of a backward pass: stage 3 releases what it still holds."""
        if self.stage3 is not None:
            self.stage3.end_iteration()

    def parameter_bytes(self, module: torch.nn.Module) -> int:
        """Bytes of parameters this rank keeps between steps on the device side (stage 3: its shards,
        unless they are offloaded, and the persistent ones)."""
        if self.stage3 is None:
            return sum(p.numel() * p.element_size() for p in module.parameters())
        sharded = {id(p) for g in self.stage3.groups for p in g.params}
        whole = sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in sharded)
        return whole + (0 if self.param_tier != "none" else sum(g.nbytes for g in self.stage3.groups))

    def tier_bytes(self) -> dict[str, dict[str, int]]:
        """Offloaded bytes per tier: ``cpu`` (resident in host memory, staging buffers included) and
        ``nvme`` (on disk), each with ``parameters``, ``master_weights``, ``optimizer_states``, ``buffers``."""
        tiers = {
            t: dict.fromkeys(("parameters", "master_weights", "optimizer_states", "buffers"), 0)
            for t in ("cpu", "nvme")
        }
        if self.stage3 is not None and self.param_tier != "none":
            tiers["cpu"]["parameters"] = sum(g.resident_nbytes for g in self.stage3.groups)
            if self.param_swap is not None:
                tiers["nvme"]["parameters"] = sum(g.nbytes for g in self.stage3.groups)
                tiers["cpu"]["buffers"] += self.param_swap.resident_bytes
        if self.offload is not None:
            masters, state = self.offload.resident_bytes()
            tiers["cpu"]["master_weights"] = masters
            tiers["cpu"]["optimizer_states"] = state
            if self.offload.swap is not None:
                on_disk_masters, on_disk_state = self.offload.stored_bytes()
                tiers["nvme"]["master_weights"] = on_disk_masters
                tiers["nvme"]["optimizer_states"] = on_disk_state
                tiers["cpu"]["buffers"] += self.offload.swap.resident_bytes
        return tiers

    def remove_hooks(self) -> None:
        """Detach every hook from the model (the engine is being torn down)."""
        self.reducer.remove_hooks()
        if self.stage3 is not None:
            self.stage3.remove_hooks()


def build_partition(
    stage: ZeroStage,
    params: Sequence[torch.nn.Parameter],
    policy: PrecisionPolicy,
    zero_cfg: Any,
    spec: ReduceSpec,
    rank: int,
    group: Any = None,
    module: torch.nn.Module | None = None,
    aio: Any = None,
) -> ZeroPartition:
    """The one ZeRO composition for ``stage`` over ``params`` on this rank (collective).

    In order: stage 3's units and shard groups (when parameters are sharded) → gradient reducer →
    shared parameters (one host) → offload sizing and optimizer offload → :class:`MasterWeights` →
    offload attach → stage 3's eviction to its tier → gatherer of updated rows → stage 3's runtime.
    The stage (data) decides what each step shards; ``aio`` is the config's ``aio`` section (NVMe tier).
    """
    world = spec.world_size
    units: Stage3Units | None = None
    if stage.shard_parameters:
        if module is None:
            raise ValueError(
                "ZeRO stage 3 needs the model: pass module= to build_partition to choose its units"
            )
        units = shard_units(module, zero_cfg, rank, world, group, aio, LOCAL_ROWS)
        trainable = units.trainable
        whole = [p for p in units.persistent if p.requires_grad]  # made whole after the step
    else:
        trainable = whole = unique_trainable(params)
    reducer = _reducer(stage, trainable, policy, zero_cfg, spec, rank, group, units)  # before the shared copy
    # sharded optimizer on one host: one shared copy of the whole parameters replaces their all-gather
    # (before the masters are made, since fp32 masters are views of the parameters' rows)
    use_shm = bool(zero_cfg.host_shared_memory)
    shared = SharedParameters.create(whole, group, use_shm) if stage.shard_optimizer and world > 1 else None
    shards = units.shards if units is not None else None
    numels = master_numels(trainable, rank, world, sharded=stage.shard_optimizer, shards=shards)
    if units is None:  # stage 3 checked its shards and masters before its swap space was made
        check_space(zero_cfg, 0, sum(numels))
    swap = units.swap if units is not None else None
    offload = optimizer_offload(zero_cfg, aio, numels, engine=swap.engine if swap is not None else None)
    param_tier = units.param_tier if units is not None else "none"
    master_args = offload_master_args(zero_cfg, offload)
    if param_tier != "none" and offload is None and trainable:
        # offloaded shards cannot be the fp32 masters (they leave memory): masters are copies then, on
        # the model's device
        master_args = {"device": trainable[0].device}
    masters = MasterWeights(
        trainable,
        needs_fp32_copy=policy.needs_master or offload is not None or param_tier != "none",
        row_range=(lambda p: ShardSpec(p.shape, world).row_range(rank)) if stage.shard_optimizer else None,
        shards=shards,
        # offload: each step writes its updated masters into the model (or the shards, via their tier)
        published_early=offload is not None or swap is not None,
        **master_args,
    )
    if offload is not None:
        offload.attach(masters)
    if units is not None:
        evict_units(units, zero_cfg)
    gatherer = (
        ParamGatherer(whole, rank, world, int(zero_cfg.allgather_bucket_size), group)
        if stage.shard_optimizer and shared is None and (units is None or whole)
        else None
    )
    runtime = stage3_runtime(module, units, zero_cfg) if units is not None and module is not None else None
    partition = ZeroPartition(
        stage,
        rank,
        world,
        group,
        reducer,
        masters,
        gatherer,
        shared,
        stage3=runtime,
        shards_shared=units.shards_shared if units is not None else False,
        offload=offload,
        param_tier=param_tier,
        param_swap=swap,
    )
    if runtime is not None:
        runtime.partition = partition
    return partition


def _reducer(
    stage: ZeroStage,
    trainable: list[torch.nn.Parameter],
    policy: PrecisionPolicy,
    zero_cfg: Any,
    spec: ReduceSpec,
    rank: int,
    group: Any,
    units: Stage3Units | None,
) -> Reducer:
    """The gradient reducer the stage asks for: stage 3 one reduce-scatter bucket per unit; stage 2
    reduce-scatter in buckets; stage 1 on one host each rank reduces its own rows in shared memory;
    otherwise (stage 0, one rank, several hosts at stage 1) an all-reduce."""
    world = spec.world_size
    overlap = bool(zero_cfg.effective_overlap_comm)
    if units is not None:
        return ReduceScatterGradReducer(
            trainable,
            policy.grad_dtype,
            units.typical_bucket(),
            spec,
            rank=rank,
            group=group,
            overlap=overlap,
            buckets=units.buckets,
        )
    bucket = int(zero_cfg.reduce_bucket_size)
    if stage.stage == 0 and "reduce_bucket_size" not in zero_cfg.model_fields_set:
        # DeepSpeed's stage 0 does not bucket during backward (its 5e8 default would make one bucket
        # and leave nothing to overlap); use DDP's 25 MiB buckets unless the user chose a size.
        bucket = STAGE0_DEFAULT_BUCKET_BYTES // torch.empty((), dtype=policy.grad_dtype).element_size()
    # Stage 0 always overlaps (DeepSpeed has no switch there); stages 1-2 follow overlap_comm.
    overlap = overlap or stage.stage == 0
    if stage.shard_gradients and world > 1:  # one rank: its shard is the whole gradient, kept in place
        return ReduceScatterGradReducer(
            trainable, policy.grad_dtype, bucket, spec, rank=rank, group=group, overlap=overlap
        )
    if stage.shard_optimizer and world > 1:
        # stage 1 on one host: gradients in shared memory, each rank reduces only its own rows
        row_range = lambda p: ShardSpec(p.shape, world).row_range(rank)  # noqa: E731
        shared = try_shared_row_reducer(
            trainable,
            policy.grad_dtype,
            bucket,
            spec,
            rank,
            row_range,
            group,
            bool(zero_cfg.host_shared_memory),
        )
        if shared is not None:
            return shared
    return AllReduceGradReducer(trainable, policy.grad_dtype, bucket, spec, group=group, overlap=overlap)


def offload_master_args(zero_cfg: Any, offload: OffloadedOptimizer | None) -> dict[str, Any]:
    """``MasterWeights`` arguments for an offloaded optimizer: masters on the host, streamed to the tier."""
    if offload is None:
        return {}
    section = zero_cfg.offload_optimizer
    return {"device": torch.device("cpu"), "pin_memory": bool(section.pin_memory), "sink": offload.sink}
