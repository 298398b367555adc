"""One ZeRO-3 unit: the parameters of one module block, sharded together and gathered together.

Each parameter of the group is split into dim-0 shards (:mod:`deepshard.zero.layout`); this rank
keeps its shards back to back in one persistent *segment* (the parameter dtype). Gathering the group
is one ``all_gather_into_tensor`` of the segments into a rank-major buffer, followed by one
multi-tensor copy of every rank's rows into the group's flat *full* buffer, of which the parameters
are views with their real shapes. Releasing the group shrinks the full buffer's storage to nothing.

Between uses a parameter keeps its real shape, dtype and device: its ``.data`` is a one-element
placeholder broadcast to that shape, holding NaN (reads show NaN; in-place writes raise). The full
buffer's storage object is kept and re-filled by every gather, so tensors autograd saved from views
of the parameters in forward see the gathered values again in backward.

Before each gather the ranks exchange the group's index on a small control group (one 8-byte
all-gather): ranks whose code paths diverged fail with a message naming each rank's unit, instead of
matching two different groups' collectives (which mixes their bytes, or aborts the process when the
sizes differ). A rank whose peers never arrive fails after the watchdog's timeout
(:mod:`deepshard.zero.watchdog`).

On one host (gloo ranks sharing a machine, :mod:`deepshard.comm.host_shm`) every group's rank-major
buffer lives in one shared-memory mapping instead: each rank's segment is its row of it, written only
between the fences of an update (optimizer step, loads), so a gather is one local copy of the peers'
rows into the full buffer, with no collective at all (and so nothing for diverging ranks to mismatch).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from deepshard import comm
from deepshard.offload.swap import PendingRead, SwapSpace
from deepshard.precision.master import as_rows
from deepshard.zero.collectives import copy_out, own_segment, rank_major_copies
from deepshard.zero.layout import BucketLayout
from deepshard.zero.rows import LOCAL_ROWS
from deepshard.zero.watchdog import CollectiveDivergedError, wait_collective

_UNPACK = ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="deepshard-unpack"
)  # NVMe reads -> full storage


class ShardedState(enum.Enum):
    """Where a group's whole values stand (FSDP2's ``ShardedState`` plus the in-flight step)."""

    SHARDED = "sharded"  # only this rank's segment; the parameters show placeholders
    GATHERING = "gathering"  # an all-gather (or a read from the NVMe tier) is in flight into a buffer
    UNSHARDED = "unsharded"  # the whole values are in the full buffer; the parameters are views of it


class SegmentTier(enum.Enum):
    """Where this rank's segment (its shards) is held between uses."""

    RESIDENT = "resident"  # in memory (device or host)
    ON_TIER = "on_tier"  # written to the NVMe tier, its memory freed


class ShardGroup:
    """The sharded parameters of one unit and the gather/release of their whole values."""

    def __init__(
        self,
        name: str,
        index: int,
        params: Sequence[torch.nn.Parameter],
        rank: int,
        world: int,
        group: Any = None,
        local_rows: Callable[[torch.nn.Parameter], torch.Tensor | None] | None = None,
        check_group: Any = None,
        shared: torch.Tensor | None = None,
        segment_device: torch.device | None = None,
        swap: SwapSpace | None = None,
    ) -> None:
        """``local_rows(p)`` may return this rank's rows of ``p`` when ``p`` holds no whole value
        (built by :class:`deepshard.zero.Init`); otherwise the rows are sliced from ``p``. ``shared``:
        the group's rank-major buffer in host shared memory (``layout.full_numel`` elements).

        Parameter offload: ``segment_device`` keeps the segment on the host (page-locked beside an
        accelerator); ``swap`` puts it on the NVMe tier, where it lives between uses (see
        :meth:`evict_segment`): a gather then first reads it, in the background from the prefetch."""
        self.name = name
        self.index = index
        self.params = list(params)
        self.rank = rank
        self.world = world
        self.group = group
        self.check_group = check_group
        dtypes = {p.dtype for p in self.params}
        devices = {p.device for p in self.params}
        if len(dtypes) != 1 or len(devices) != 1:
            raise ValueError(
                f"ZeRO-3 unit '{name}' mixes dtypes {sorted(map(str, dtypes))} / devices {sorted(map(str, devices))}; "
                "cast the model to one dtype and device before initialize()."
            )
        self.dtype, self.device = dtypes.pop(), devices.pop()
        self.layout = BucketLayout([p.shape for p in self.params], world)
        self.numel = sum(p.numel() for p in self.params)
        seg = self.layout.segment_numel
        # this rank's shards of every member, back to back (its row of the shared buffer on one host)
        self.shared = shared
        on = segment_device or self.device
        pin = on.type == "cpu" and self.device.type != "cpu" and swap is None and torch.cuda.is_available()
        self.segment = (
            shared.view(world, seg)[rank]
            if shared is not None
            else torch.zeros(seg, dtype=self.dtype, device=on, pin_memory=pin)
        )
        self.swap = swap
        self._key = f"unit{index}.{name}"
        self._seg_bytes = seg * self.segment.element_size()
        self._read: PendingRead | None = None
        self._unpacked: Future[torch.Tensor] | None = None
        self.segment_tier = SegmentTier.RESIDENT
        self.trainable = sum(
            p.requires_grad for p in self.params
        )  # members with masters (rewritten each step)
        self._left_to_publish = 0
        self.keep_in_memory = False  # offload_param.max_in_cpu: this unit's segment stays in host memory
        if swap is not None:
            swap.slot(self._key, self._seg_bytes)
        self.shards = [self.layout.segment_view(self.segment, i, rank) for i in range(len(self.params))]
        self._slot = {id(p): i for i, p in enumerate(self.params)}
        with torch.no_grad():
            for i, (p, shard) in enumerate(zip(self.params, self.shards)):
                rows = local_rows(p) if local_rows is not None else None
                if rows is not None and rows.numel() != shard.numel():
                    raise ValueError(
                        f"parameter of shape {tuple(p.shape)} in ZeRO-3 unit '{name}' was built by zero.Init with "
                        f"{rows.numel()} elements on this rank, but rank {rank} of {world} owns {shard.numel()}: "
                        "build the model under zero.Init with the data-parallel group that initialize() uses."
                    )
                if rows is None:
                    start, end = self.layout.specs[i].row_range(rank)
                    rows = as_rows(p.detach())[start:end]
                shard.copy_(rows.reshape(shard.shape))
        self.full = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in self.params:
            self.views.append(self.full[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        # (full offset, rank-major offset, numel) of every rank's rows of every member
        self._copies = rank_major_copies(self.layout, [p.numel() for p in self.params])
        nan = torch.full((1,), float("nan"), dtype=self.dtype, device=self.device)
        self.placeholders = [nan.expand(p.shape) if p.dim() else nan.view(()) for p in self.params]
        self._full_bytes = self.numel * self.full.element_size()
        self._work: Any = None  # the in-flight collective's handle while GATHERING
        self._buffer: torch.Tensor | None = None
        self._release_buffer: Callable[[torch.Tensor], None] | None = None
        self.state = ShardedState.SHARDED
        self.runtime: Any = None  # the Stage3Runtime driving this group
        self.release()

    def shard_of(self, param: torch.Tensor) -> torch.Tensor:
        """This rank's rows of member ``param`` (read from the NVMe tier first if the segment lives there)."""
        self.load_segment()
        return self.shards[self._slot[id(param)]]

    # ------------------------------------------------------------------ the segment's tier (offload)
    @torch.no_grad()
    def _unpack_staged(self, pending: PendingRead) -> torch.Tensor:
        """(Worker thread, one rank) wait for the segment's read and copy it into the full storage."""
        staged = pending.wait()
        copy_out(self.full, self._staged(staged), self._copies)
        return staged

    def _staged(self, buffer: torch.Tensor) -> torch.Tensor:
        return buffer[: self._seg_bytes].view(self.dtype)

    @torch.no_grad()
    def load_segment(self) -> None:
        """Make the segment resident (a blocking read from the NVMe tier); no-op when it is."""
        if self.swap is None or self.segment_resident:
            return
        self.segment.untyped_storage().resize_(self._seg_bytes)
        buffer = self.swap.read([(self._key, self._seg_bytes)]).wait()
        self.segment.copy_(self._staged(buffer))
        self.swap.give(buffer)
        self.segment_tier = SegmentTier.RESIDENT

    @torch.no_grad()
    def evict_segment(self) -> None:
        """Write the segment to the NVMe tier (in the background) and free its memory; no-op without one."""
        if self.swap is None or not self.segment_resident or self.keep_in_memory:
            return
        buffer = self.swap.take(self._seg_bytes)
        self._staged(buffer).copy_(self.segment)
        self.swap.write([(self._key, self._seg_bytes)], buffer)
        self.segment.untyped_storage().resize_(0)
        self.segment_tier = SegmentTier.ON_TIER

    def begin_publish(self) -> None:
        """Before updated masters are written into the shards: make the segment writable. When every
        member is rewritten (all trainable) its old bytes are not needed, so nothing is read."""
        if self.swap is None or self.segment_resident:
            return
        if self.trainable == len(self.params):
            self.segment.untyped_storage().resize_(self._seg_bytes)
            self.segment_tier = SegmentTier.RESIDENT
        else:
            self.load_segment()

    def member_published(self) -> None:
        """One member's shard was written; after the last, the segment goes back to its tier."""
        if self.swap is None:
            return
        self._left_to_publish = (self._left_to_publish or self.trainable) - 1
        if self._left_to_publish == 0:
            self.evict_segment()

    # ------------------------------------------------------------------ state
    @property
    def gathering(self) -> bool:
        """Whether an all-gather of this group is in flight."""
        return self.state is ShardedState.GATHERING

    @property
    def unsharded(self) -> bool:
        """Whether the whole values are installed in the parameters."""
        return self.state is ShardedState.UNSHARDED

    @property
    def segment_resident(self) -> bool:
        """Whether this rank's segment is in memory (not only on the NVMe tier)."""
        return self.segment_tier is SegmentTier.RESIDENT

    @property
    def gather_numel(self) -> int:
        """Elements of the rank-major buffer one gather needs."""
        return self.layout.full_numel

    @property
    def reading(self) -> bool:
        """Whether a read of the segment from the NVMe tier is in flight (its gather not finished)."""
        return self._read is not None

    def holds_values(self) -> bool:
        """Whether the whole values are resident (measured on the storage, not on the state flag)."""
        return self.full.untyped_storage().nbytes() > 0

    # ------------------------------------------------------------------ gather / release
    def _check_peers(self, what: str) -> None:
        """Collective: every rank must be gathering this group now; else name what each rank gathers."""
        if self.check_group is None:
            return
        mine = torch.tensor([self.index], dtype=torch.int64)
        seen = torch.empty(self.world, dtype=torch.int64)
        work = comm.all_gather_into_tensor(seen, mine, group=self.check_group, async_op=True)
        wait_collective(work, f"all-gather of ZeRO-3 unit '{self.name}' ({what})", self.rank)
        if bool((seen != self.index).any()):
            names = self.runtime.unit_names if self.runtime is not None else {}
            wanted = {q: names.get(int(i), f"#{int(i)}") for q, i in enumerate(seen.tolist())}
            raise CollectiveDivergedError(
                f"ZeRO-3 ranks diverged at an all-gather: rank {self.rank} gathers unit '{self.name}' ({what}), "
                f"while the ranks gather {wanted} (rank -> unit). A rank took a different code path through "
                "the model; mark data-dependent blocks with deepshard.zero.set_z3_leaf_modules() so that "
                "they are gathered whole."
            )

    @torch.no_grad()
    def start_gather(
        self,
        buffer: torch.Tensor | None,
        release_buffer: Callable[[torch.Tensor], None] | None = None,
        what: str = "gather",
    ) -> None:
        """Launch the all-gather into ``buffer`` (``gather_numel`` elements of the group's dtype;
        ``None`` when the group's buffer is shared: the peers' rows are already there)."""
        if self.unsharded or self.gathering:
            return
        if self.shared is not None:
            self._buffer, self._release_buffer, self._work = self.shared, None, _Done()
            self.state = ShardedState.GATHERING
            return
        assert buffer is not None, "a gather without shared memory needs a buffer"
        self._check_peers(what)
        self._buffer, self._release_buffer = buffer, release_buffer
        if self.swap is not None and not self.segment_resident:
            # read the segment from NVMe in the background; the all-gather follows in finish_gather
            self._read = self.swap.read([(self._key, self._seg_bytes)])
            self._work = _Done()
            self.state = ShardedState.GATHERING
            if self.world == 1:
                # one rank: the segment is the whole buffer; unpack it into the full storage off the
                # main thread as soon as it arrives (the copy and the first touch of the pages overlap)
                self.full.untyped_storage().resize_(self._full_bytes)
                self._unpacked = _UNPACK.submit(self._unpack_staged, self._read)
            return
        mine = own_segment(self.layout, buffer, self.rank)
        mine.copy_(self.segment, non_blocking=True)
        self._work = comm.all_gather_into_tensor(buffer, mine, group=self.group, async_op=True)
        if self._work is None:  # not distributed: nothing in flight
            self._work = _Done()
        self.state = ShardedState.GATHERING

    @torch.no_grad()
    def finish_gather(self, what: str) -> None:
        """Wait for the gather (``what`` names the pass in errors), then install the whole values."""
        if self.unsharded:
            return
        assert self._work is not None and self._buffer is not None, "finish_gather() without start_gather()"
        buffer, work = self._buffer, self._work
        if self._unpacked is not None:  # one rank, read from NVMe: already unpacked into the full storage
            staged = self._unpacked.result()
            self._unpacked = self._read = None
            assert self.swap is not None
            self.swap.give(staged)
            if self._release_buffer is not None:
                self._release_buffer(buffer)
            self._work = self._buffer = self._release_buffer = None
            for p, view in zip(self.params, self.views):
                p.data = view
            self.state = ShardedState.UNSHARDED
            return
        if self._read is not None:  # several ranks: this rank's segment arrived from NVMe, all-gather it now
            staged = self._read.wait()
            self._read = None
            mine = own_segment(self.layout, buffer, self.rank)
            mine.copy_(self._staged(staged))
            assert self.swap is not None
            self.swap.give(staged)
            work = comm.all_gather_into_tensor(buffer, mine, group=self.group, async_op=True) or _Done()
        wait_collective(work, f"all-gather of ZeRO-3 unit '{self.name}' ({what})", self.rank)
        self._work = None
        self.full.untyped_storage().resize_(self._full_bytes)
        copy_out(self.full, buffer, self._copies)
        if self._release_buffer is not None:
            self._release_buffer(buffer)
        self._buffer = self._release_buffer = None
        for p, view in zip(self.params, self.views):
            p.data = view
        self.state = ShardedState.UNSHARDED

    def gather(self, what: str = "explicit gather") -> None:
        """Gather now (blocking), with a buffer of its own."""
        if not self.unsharded:
            if not self.gathering:
                buffer = (
                    None
                    if self.shared is not None
                    else torch.empty(self.gather_numel, dtype=self.dtype, device=self.device)
                )
                self.start_gather(buffer, what=what)
            self.finish_gather(what)

    @torch.no_grad()
    def release(self) -> None:
        """Drop the whole values; parameters show placeholders of their real shape again."""
        if self.gathering:
            self.finish_gather("release")
        for p, placeholder in zip(self.params, self.placeholders):
            p.data = placeholder
        self.full.untyped_storage().resize_(0)
        self.state = ShardedState.SHARDED

    @torch.no_grad()
    def write_back(self) -> None:
        """Copy this rank's rows of the current whole values into its shards (after an in-place edit)."""
        if not self.unsharded:
            return
        was_resident = self.segment_resident
        self.load_segment()
        for i, (view, shard) in enumerate(zip(self.views, self.shards)):
            start, end = self.layout.specs[i].row_range(self.rank)
            if end > start:
                shard.copy_(as_rows(view)[start:end].reshape(shard.shape))
        if not was_resident:
            self.evict_segment()

    @property
    def resident_nbytes(self) -> int:
        """Bytes of the segment in memory now (0 while it lives on the NVMe tier)."""
        return int(self.segment.untyped_storage().nbytes()) if self.shared is None else self.nbytes

    @property
    def nbytes(self) -> int:
        """Bytes of this rank's shards (the persistent state of the group)."""
        return self.layout.segment_numel * self.segment.element_size()


class _Done:
    """A completed collective (single process)."""

    def wait(self, *args: Any) -> bool:
        return True


@torch.no_grad()
def cast_module(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """``model.to(device, dtype)``, without materialising parameters built sharded by zero.Init.

    Their rows are cast instead, and their placeholders rebuilt in the new dtype.
    """
    for p in model.parameters():
        rows = LOCAL_ROWS.get(p)
        if rows is not None:
            rows = rows.to(device=device, dtype=dtype if rows.is_floating_point() else rows.dtype)
            LOCAL_ROWS.set(p, rows)
            nan = torch.full((1,), float("nan"), dtype=rows.dtype, device=device)
            p.data = nan.expand(p.shape) if p.dim() else nan.view(())
    model.to(device=device, dtype=dtype)
