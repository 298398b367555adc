"""What a checkpoint holds, collected from an engine by fully-qualified name, and put back.

Tensors go to ``torch.distributed.checkpoint`` under flat keys:

* ``model.<fqn>``                  every entry of ``module.state_dict()`` in the module's dtype (tied
                                   weights once, under their first name; the other names are aliases);
* ``master.<fqn>``                 fp32 master weights when they are separate tensors (bf16/fp16);
* ``optim.state.<fqn>.<key>``      each optimizer state tensor (``exp_avg``, ``step``, ...) of the
                                   master for parameter ``<fqn>``.

A tensor is either a plain tensor (replicated: the same on every rank of the group, saved once) or,
at ZeRO stages 1-2 on more than one rank, this rank's dim-0 rows of a whole tensor (the fp32 masters
and the optimizer state shaped like them). Those are handed to DCP as ``DTensor`` objects placed
``Shard(0)`` over the data-parallel mesh (torch.chunk rows: :mod:`deepshard.zero.layout`'s split),
so each rank writes its rows and a load on any number of ranks reads the rows it needs. Model
weights stay plain at every stage (whole on every rank; DCP de-duplicates them). A 0-d parameter's
master (one row, owned by rank 0) is broadcast and saved whole, as stage 0 saves it. Everything that
is not a tensor goes to ``engine_state.pt`` (rank 0) and ``rank_NNNNN.pt`` (per rank) as plain
containers that ``torch.load(weights_only=True)`` accepts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from deepshard.checkpoint import rng
from deepshard.checkpoint.layout import FORMAT_VERSION

MODEL = "model."
MASTER = "master."
OPTIM = "optim.state."


@dataclass
class Captured:
    """One save's content: DCP tensors by key, rank 0's engine state, this rank's own state.

    ``tensors`` are plain: whole (replicated) tensors, or, for the keys in ``global_shapes``, this
    rank's dim-0 rows of a tensor of that shape. :meth:`dcp_state` wraps the latter as DTensors.
    """

    tensors: dict[str, torch.Tensor]
    engine_state: dict[str, Any]
    rank_state: dict[str, Any]
    global_shapes: dict[str, torch.Size] = field(default_factory=dict)

    def staged(self) -> Captured:
        """A copy that training may not touch (for an asynchronous save): tensors copied to host memory."""
        return Captured(
            tensors={k: _host_copy(v) for k, v in self.tensors.items()},
            engine_state=copy.deepcopy(self.engine_state),
            rank_state=copy.deepcopy(self.rank_state),
            global_shapes=dict(self.global_shapes),
        )

    def dcp_state(self, mesh: DeviceMesh | None) -> dict[str, torch.Tensor]:
        """The state dict for ``dcp.save``: row shards as DTensors ``Shard(0)`` on ``mesh``, the rest plain."""
        if self.global_shapes and mesh is None:
            raise AssertionError("sharded checkpoint state needs the data-parallel device mesh")
        return {
            k: shard_tensor(t, self.global_shapes[k], mesh) if k in self.global_shapes else t
            for k, t in self.tensors.items()
        }

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this rank holds for the save."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    stride, out = 1, []
    for d in reversed(shape):
        out.append(stride)
        stride *= max(d, 1)
    return tuple(reversed(out))


def shard_tensor(local: torch.Tensor, shape: torch.Size, mesh: DeviceMesh | None) -> torch.Tensor:
    """``local`` (this rank's torch.chunk rows of a tensor of ``shape``) as a ``Shard(0)`` DTensor on ``mesh``.

    Without a mesh (one rank) ``local`` is the whole tensor and is returned as is. The DTensor shares
    ``local``'s memory, so DCP writes loaded rows into it in place.
    """
    if mesh is None:
        return local
    return DTensor.from_local(
        local,
        mesh,
        [Shard(0)],
        run_check=False,
        shape=torch.Size(shape),
        stride=_contiguous_stride(torch.Size(shape)),
    )


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    out = torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=t.is_cuda)
    out.copy_(t.detach())
    return out


# ---------------------------------------------------------------------------------------------- module
@dataclass
class ModuleEntries:
    """``module.state_dict()`` split into unique tensors, aliases of tied tensors and non-tensor extras."""

    tensors: dict[str, torch.Tensor]
    aliases: dict[str, str]
    extras: dict[str, Any]
    frozen: set[str]


def module_entries(
    module: torch.nn.Module, exclude_frozen: bool = False, state: dict[str, Any] | None = None
) -> ModuleEntries:
    """The module's state by FQN (``state``: instead of ``module.state_dict()``, e.g. ZeRO-3's whole
    one); a tensor shared by several names is kept under its first name."""
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    extras: dict[str, Any] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, value in (module.state_dict() if state is None else state).items():
        if exclude_frozen and key in frozen:
            continue
        if not isinstance(value, torch.Tensor):
            extras[key] = value
            continue
        local = _local(value)
        ident = (
            local.untyped_storage().data_ptr(),
            local.storage_offset(),
            tuple(local.shape),
            local.stride(),
            local.dtype,
        )
        if local.numel() > 0 and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = value
    return ModuleEntries(tensors, aliases, extras, frozen)


def master_pairs(engine: Any) -> list[tuple[str, torch.nn.Parameter, torch.Tensor]]:
    """``(fqn, parameter, master)`` for each trainable parameter the engine keeps a master for."""
    names = {id(p): n for n, p in engine.module.named_parameters()}
    masters = engine.masters
    return [(names[id(p)], p, m) for p, m in zip(masters.params, masters.masters)]


def separate_masters(engine: Any) -> bool:
    """Whether the masters are fp32 copies (bf16/fp16), not the parameters or views of their rows (fp32)."""
    return bool(engine.masters.needs_fp32_copy)


def sharded_rows(engine: Any) -> bool:
    """Whether masters and optimizer state hold only this rank's rows of parameters (ZeRO >= 1, > 1 rank)."""
    return bool(engine.masters.sharded) and int(engine.dp_world_size) > 1


@dataclass(frozen=True)
class RowShard:
    """How one master's tensors are stored: this rank's ``rows`` of a tensor of ``shape``."""

    shape: torch.Size
    rows: tuple[int, int]

    @property
    def scalar(self) -> bool:
        """A 0-d parameter: one row, owned by the group's rank 0, stored whole."""
        return len(self.shape) == 0


def row_shards(engine: Any) -> dict[str, RowShard]:
    """FQN -> :class:`RowShard` for each master when the stage shards them (on one rank: all rows)."""
    if not engine.masters.sharded:
        return {}
    return {
        n: RowShard(p.shape, rows) for (n, p, _), rows in zip(master_pairs(engine), engine.masters.ranges)
    }


def module_row_shards(engine: Any) -> dict[str, RowShard]:
    """FQN -> :class:`RowShard` for module entries that hold this rank's rows (ZeRO-3 sharded parameters)."""
    runtime = getattr(engine.partition, "stage3", None)
    if runtime is None:
        return {}
    world, rank = int(engine.dp_world_size), int(engine.partition.rank)
    from deepshard.zero.layout import ShardSpec

    return {
        name: RowShard(p.shape, ShardSpec(p.shape, world).row_range(rank))
        for name, p in runtime.named_sharded()
    }


def _whole_scalar(local: torch.Tensor, group: Any, world: int) -> torch.Tensor:
    """Collective: the 0-d tensor whose single row the group's rank 0 holds, on every rank."""
    if world == 1:
        return local.reshape(())
    whole = torch.empty((), dtype=local.dtype, device=local.device)
    if dist.get_rank(group) == 0:
        whole.copy_(local.reshape(()))
    dist.broadcast(whole, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return whole


def optimizer_fqns(engine: Any) -> list[list[str]]:
    """FQNs of the parameters behind each optimizer group's tensors (masters or parameters)."""
    by_id = {id(m): n for n, _, m in master_pairs(engine)}
    by_id.update({id(p): n for n, p in engine.module.named_parameters()})
    out = []
    for gi, group in enumerate(engine.optimizer.param_groups):
        try:
            out.append([by_id[id(t)] for t in group["params"]])
        except KeyError:
            raise ValueError(
                f"optimizer param_groups[{gi}] holds a tensor that is neither a parameter of the model nor its "
                "master copy, so it has no name to checkpoint under; build the optimizer from model.parameters()."
            ) from None
    return out


# ---------------------------------------------------------------------------------------------- capture
def capture(engine: Any, client_state: dict[str, Any] | None, exclude_frozen: bool) -> Captured:
    """Everything a resume needs, as references to the live tensors (copy with :meth:`Captured.staged`).

    Collective when the state is sharded and a parameter is 0-d (its master is broadcast).
    """
    entries = module_entries(engine.module, exclude_frozen)
    tensors: dict[str, torch.Tensor] = {MODEL + k: v.detach() for k, v in entries.tensors.items()}
    global_shapes: dict[str, torch.Size] = {}
    shards = row_shards(engine)
    distributed = sharded_rows(engine)  # rows of more than one rank: DTensors
    for name, shard in module_row_shards(engine).items():  # ZeRO-3: the module holds rows too
        if MODEL + name not in tensors:
            continue
        if shard.scalar:
            tensors[MODEL + name] = _whole_scalar(
                tensors[MODEL + name], engine.dp_group, int(engine.dp_world_size)
            )
        elif distributed:
            global_shapes[MODEL + name] = shard.shape

    def put(key: str, name: str, value: torch.Tensor, master: torch.Tensor) -> None:
        shard = shards.get(name)
        if shard is None or value.dim() == 0 and master.dim() != 0:  # unsharded, or a scalar like Adam's step
            tensors[key] = value.detach()
        elif tuple(value.shape) != tuple(master.shape):
            raise ValueError(
                f"optimizer state {key} has shape {tuple(value.shape)}, neither a scalar nor the shape of this "
                f"rank's rows of {name} {tuple(master.shape)}; deepshard cannot tell how it is sharded across "
                "ranks. Use an optimizer whose state is per-element (Adam, AdamW, SGD, ...) or ZeRO stage 0."
            )
        elif shard.scalar:
            tensors[key] = _whole_scalar(value.detach(), engine.dp_group, int(engine.dp_world_size))
        else:
            tensors[key] = value.detach()
            if distributed:
                global_shapes[key] = shard.shape

    pairs = master_pairs(engine)
    masters = [n for n, _, _ in pairs] if separate_masters(engine) else []
    if masters:
        for name, _, master in pairs:
            put(MASTER + name, name, master, master)

    optimizer_state = None
    if engine.optimizer is not None:
        master_of = {n: m for n, _, m in pairs}
        groups = []
        per_param: dict[str, dict[str, Any]] = {}
        for group_, names in zip(engine.optimizer.param_groups, optimizer_fqns(engine)):
            groups.append({**{k: v for k, v in group_.items() if k != "params"}, "params": names})
            for tensor, name in zip(group_["params"], names):
                slots: dict[str, Any] = {}
                for key, value in engine.optimizer.state.get(tensor, {}).items():
                    if isinstance(value, torch.Tensor):
                        put(f"{OPTIM}{name}.{key}", name, value, master_of.get(name, tensor))
                        slots[key] = {"tensor": f"{OPTIM}{name}.{key}"}
                    else:
                        slots[key] = {"value": value}
                per_param[name] = slots
        optimizer_state = {"param_groups": groups, "state": per_param}

    loader = engine.training_dataloader
    engine_state: dict[str, Any] = {
        "version": FORMAT_VERSION,
        "zero_stage": int(engine.zero_optimization_stage()),
        "dp_world_size": int(engine.dp_world_size),
        "param_dtype": str(next(iter(entries.tensors.values())).dtype) if entries.tensors else "",
        "counters": capture_counters(engine),
        "module": {
            "keys": list(entries.tensors),
            "aliases": entries.aliases,
            "extras": entries.extras,
            "excluded_frozen": sorted(entries.frozen) if exclude_frozen else [],
        },
        "masters": masters,
        "optimizer": optimizer_state,
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "loss_scaler": engine.loss_scaler.state_dict(),
        "client_state": dict(client_state or {}),
    }
    rank_state = {
        "rng": rng.capture(),
        "dataloader": loader.state_dict() if loader is not None and hasattr(loader, "state_dict") else None,
    }
    return Captured(tensors, engine_state, rank_state, global_shapes)


COUNTERS = ("global_steps", "global_samples", "skipped_steps", "micro_steps")
"""The engine's step counters a checkpoint carries (DeepSpeed's names)."""


def capture_counters(engine: Any) -> dict[str, int]:
    """The engine's :data:`COUNTERS` by name."""
    return {
        "global_steps": int(engine.global_steps),
        "global_samples": int(engine.global_samples),
        "skipped_steps": int(engine.skipped_steps),
        "micro_steps": int(engine.micro_steps),
    }


def restore_counters(engine: Any, values: dict[str, Any]) -> None:
    """Set the engine's counters present in ``values`` (read from a checkpoint file).

    Only the names in :data:`COUNTERS` are accepted, each assigned to its own attribute: a file never
    chooses which attribute of the engine is written.
    """
    unknown = sorted(set(values) - set(COUNTERS))
    if unknown:
        raise ValueError(
            f"checkpoint counters {unknown} are not engine counters (known: {list(COUNTERS)}); the file was "
            "not written by deepshard or DeepSpeed, or is damaged: load another checkpoint"
        )
    if "global_steps" in values:
        engine.global_steps = int(values["global_steps"])
    if "global_samples" in values:
        engine.global_samples = int(values["global_samples"])
    if "skipped_steps" in values:
        engine.skipped_steps = int(values["skipped_steps"])
    if "micro_steps" in values:
        engine.micro_steps = int(values["micro_steps"])
