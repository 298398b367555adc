"""Put a checkpoint back into an engine: the module, masters, optimizer state and the rest.

Every rank reads what it holds, in the layout of the engine that loads (any ZeRO stage, any number
of ranks), whatever layout saved it: ``torch.distributed.checkpoint`` reshards on read. Replicated
tensors are read whole; at ZeRO stages 1-2 the masters and the optimizer state are read as
``Shard(0)`` DTensors over this engine's data-parallel mesh, so each rank reads only its rows.
Tensors are read in place into the engine's own tensors; the optimizer's state is first allocated
from the checkpoint's metadata (it may not exist yet in a fresh optimizer), then handed to
``optimizer.load_state_dict``.

With optimizer states, the masters are the source of every trainable parameter: they are read (fp32
where the checkpoint has fp32 masters) and then published into the module (cast, and all-gathered at
stages 1-2), exactly as after an optimizer step. Without them, the module is read and the masters
follow it, as DeepSpeed does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.device_mesh import DeviceMesh

from deepshard.checkpoint import _dist, rng
from deepshard.checkpoint.layout import ENGINE_STATE, rank_file
from deepshard.checkpoint.state import (
    MASTER,
    MODEL,
    RowShard,
    master_pairs,
    module_entries,
    module_row_shards,
    optimizer_fqns,
    restore_counters,
    row_shards,
    shard_tensor,
    sharded_rows,
)
from deepshard.utils.logging import log_dist


@dataclass(frozen=True)
class LoadOptions:
    """DeepSpeed's ``load_checkpoint`` switches."""

    strict: bool = True
    optimizer_states: bool = True
    lr_scheduler_states: bool = True
    module_only: bool = False


def read_engine_state(path: Path) -> dict[str, Any]:
    """``engine_state.pt`` of a checkpoint, loaded with ``weights_only=True``."""
    return torch.load(path / ENGINE_STATE, map_location="cpu", weights_only=True)


def tensor_metadata(path: Path) -> dict[str, TensorStorageMetadata]:
    """Global shape and dtype of every tensor in the checkpoint's DCP part, by key."""
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k: v for k, v in meta.items() if isinstance(v, TensorStorageMetadata)}


def read_into(
    path: Path, targets: dict[str, torch.Tensor], group: Any = None, no_dist: bool | None = None
) -> None:
    """Read the checkpoint tensors named by ``targets``' keys into those tensors, in place."""
    if not targets:
        return
    no_dist = not _dist.initialized() if no_dist is None else no_dist
    with _dist.quiet_single_process():
        dcp.load(
            targets, storage_reader=dcp.FileSystemReader(str(path)), process_group=group, no_dist=no_dist
        )


class _Targets:
    """What one load reads: DCP targets by key, and copies to make once they are read.

    A target is a plain tensor (read whole) or a ``Shard(0)`` DTensor over ``mesh`` (this rank's
    rows). A 0-d parameter's state is stored whole: it is read into a scalar and copied into the
    single row that the group's rank 0 owns. :meth:`result` is the tensor that holds a key's value
    on this rank once read (for such a scalar: the rows, empty on the ranks that own none).
    """

    def __init__(self, path: Path, meta: dict[str, TensorStorageMetadata], mesh: DeviceMesh | None) -> None:
        self.path, self.meta, self.mesh = path, meta, mesh
        self.tensors: dict[str, torch.Tensor] = {}
        self.after: list[tuple[torch.Tensor, torch.Tensor]] = []  # (destination rows, loaded scalar)
        self._rows_of_scalar: dict[
            str, torch.Tensor
        ] = {}  # key -> destination rows of a 0-d parameter's state

    def whole(self, key: str, target: torch.Tensor) -> None:
        """Read ``key`` whole into ``target``."""
        _check_shape(key, self.meta[key], target.shape, self.path)
        self.tensors[key] = target.detach()

    def rows(self, key: str, local: torch.Tensor, shard: RowShard | None) -> None:
        """Read the rows of ``key`` that ``local`` holds (all of it when ``shard`` is ``None``)."""
        if shard is None:
            self.whole(key, local)
            return
        _check_shape(key, self.meta[key], shard.shape, self.path)
        if shard.scalar:
            scalar = torch.empty((), dtype=local.dtype, device=local.device)
            self.tensors[key] = scalar
            self.after.append((local, scalar))
            self._rows_of_scalar[key] = local
        else:
            self.tensors[key] = shard_tensor(local.detach(), shard.shape, self.mesh)

    def result(self, key: str) -> torch.Tensor:
        """This rank's tensor for ``key`` after :meth:`read`, shaped like the tensor it belongs to."""
        rows = self._rows_of_scalar.get(key)
        return rows if rows is not None else _local(self.tensors[key])

    def read(self) -> None:
        """Collective: read every target, then copy scalars into their rows."""
        read_into(self.path, self.tensors)
        with torch.no_grad():
            for dest, scalar in self.after:
                if dest.numel():
                    dest.copy_(scalar.reshape(dest.shape))


def _check_shape(key: str, meta: TensorStorageMetadata, shape: torch.Size, path: Path) -> None:
    if tuple(meta.size) != tuple(shape):
        raise ValueError(
            f"{key} has shape {tuple(meta.size)} in the checkpoint {path} but {tuple(shape)} in the model; "
            "the checkpoint was saved from a different model configuration."
        )


def check_module_match(what: str, missing: list[str], unexpected: list[str], strict: bool) -> None:
    """Refuse (strict) or warn about module entries that the checkpoint ``what`` lacks or has extra."""
    if strict and (missing or unexpected):
        raise ValueError(
            f"{what} does not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}. Pass load_module_strict=False to "
            "load the matching entries only."
        )
    if missing or unexpected:
        log_dist(f"loading {what} non-strictly: missing {missing}, unexpected {unexpected}", ranks=[0],
                 level=logging.WARNING)  # fmt: skip


def _module_keys(engine: Any, path: Path, es: dict[str, Any], opts: LoadOptions) -> dict[str, str]:
    """Module state key -> the saved name it loads from (tied names resolved), after the strictness check."""
    entries = module_entries(engine.module)
    saved = es["module"]
    saved_names = set(saved["keys"]) | set(saved["aliases"])
    current_names = set(entries.tensors) | set(entries.aliases)
    excluded = set(saved["excluded_frozen"])
    check_module_match(
        f"the checkpoint {path}", sorted(current_names - saved_names - excluded), sorted(saved_names - current_names),
        opts.strict,
    )  # fmt: skip
    out = {}
    for key in entries.tensors:
        source = saved["aliases"].get(key, key)
        if source in saved["keys"]:
            out[key] = source
    return out


def _best_key(source: str, meta: dict[str, Any]) -> str:
    """The DCP key with the most precise saved value of ``source``: its fp32 master if saved, else the module's."""
    return MASTER + source if MASTER + source in meta else MODEL + source


def _optimizer_targets(
    engine: Any, targets: _Targets, es: dict[str, Any], shards: dict[str, RowShard]
) -> dict[str, Any]:
    """Add the optimizer state to ``targets``; return a ``state_dict`` skeleton that refers to them by key."""
    saved = es["optimizer"]
    current = optimizer_fqns(engine)
    saved_groups = [g["params"] for g in saved["param_groups"]]
    if saved_groups != current:
        raise ValueError(
            f"the optimizer in {targets.path} has parameter groups {[len(g) for g in saved_groups]} (sizes) that do "
            f"not match this optimizer's {[len(g) for g in current]} by parameter name; build the optimizer the same "
            "way, or pass load_optimizer_states=False."
        )
    tensor_of = {n: m for n, _, m in master_pairs(engine)}
    tensor_of.update(
        {n: t for g, names in zip(engine.optimizer.param_groups, current) for n, t in zip(names, g["params"])}
    )
    whole_shapes = {n: p.shape for n, p, _ in master_pairs(engine)}
    per_element = _per_element_keys(saved["state"], targets.meta, whole_shapes)
    state: dict[int, dict[str, Any]] = {}
    index = 0
    for names in current:
        for name in names:
            slots = saved["state"].get(name, {})
            if slots:
                state[index] = {}
            like = tensor_of[name]
            shard = shards.get(name)
            whole_shape = shard.shape if shard is not None else like.shape
            for key, slot in slots.items():
                if "value" in slot:
                    state[index][key] = slot["value"]
                    continue
                md = targets.meta[slot["tensor"]]
                if tuple(md.size) == tuple(whole_shape) and (len(whole_shape) > 0 or key in per_element):
                    # per-element state (exp_avg, ...): this rank's rows, like the master
                    targets.rows(slot["tensor"], torch.empty_like(like, dtype=md.properties.dtype), shard)
                else:  # e.g. Adam's 0-d ``step``: the same on every rank
                    targets.whole(
                        slot["tensor"],
                        torch.empty(tuple(md.size), dtype=md.properties.dtype, device=like.device),
                    )
                state[index][key] = slot["tensor"]
            index += 1
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in saved["param_groups"]]
    index = 0
    for group, names in zip(groups, current):
        group["params"] = list(range(index, index + len(names)))
        index += len(names)
    return {"state": state, "param_groups": groups}


def _per_element_keys(
    saved_state: dict[str, dict[str, Any]],
    meta: dict[str, TensorStorageMetadata],
    whole_shapes: dict[str, torch.Size],
) -> set[str]:
    """Optimizer state keys that are per-element (shaped like their parameter) for some parameter of rank >= 1.

    A 0-d parameter's per-element state (``exp_avg``) and scalar state (Adam's ``step``) are both 0-d;
    the other parameters tell which key is which.
    """
    keys = set()
    for name, slots in saved_state.items():
        shape = whole_shapes.get(name)
        for key, slot in slots.items():
            if (
                shape is not None
                and len(shape) > 0
                and "tensor" in slot
                and tuple(meta[slot["tensor"]].size) == tuple(shape)
            ):
                keys.add(key)
    return keys


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def load_into_engine(
    engine: Any, path: Path, opts: LoadOptions, mesh: DeviceMesh | None = None
) -> dict[str, Any]:
    """Collective: restore ``engine`` from the verified checkpoint at ``path``; return the client state.

    ``mesh`` is the engine's data-parallel device mesh; it is needed when the engine's masters are
    sharded (ZeRO stages 1-2 on more than one rank).
    """
    es = read_engine_state(path)
    meta = tensor_metadata(path)
    restore_all = not opts.module_only
    want_optimizer = restore_all and opts.optimizer_states and engine.optimizer is not None
    if want_optimizer and es["optimizer"] is None:
        log_dist(
            f"{path} holds no optimizer state; the optimizer starts fresh", ranks=[0], level=logging.WARNING
        )
        want_optimizer = False
    shards = row_shards(engine)
    if sharded_rows(engine) and mesh is None:
        raise AssertionError("loading sharded masters needs the data-parallel device mesh")

    targets = _Targets(path, meta, mesh)
    sources = _module_keys(engine, path, es, opts)
    pairs = master_pairs(engine)
    from_masters = {n for n, _, _ in pairs if n in sources} if want_optimizer else set()
    module_rows = module_row_shards(engine)  # ZeRO-3: the module holds this rank's rows
    for key, tensor in module_entries(engine.module).tensors.items():
        if key in sources and key not in from_masters:
            targets.rows(MODEL + sources[key], tensor, module_rows.get(key))
    skeleton: dict[str, Any] = {}
    if want_optimizer:
        # masters first: the module's trainable parameters are published from them below
        for name, _, master in pairs:
            if name in from_masters:
                targets.rows(_best_key(sources[name], meta), master, shards.get(name))
        skeleton = _optimizer_targets(engine, targets, es, shards)
    engine.partition.begin_update()  # no rank still reads parameters that this read overwrites
    targets.read()
    if want_optimizer:
        engine.partition.publish()  # masters -> whole module parameters (cast; all-gathered at stages 1-2)
        for slots in skeleton["state"].values():
            for key, value in slots.items():
                if isinstance(value, str) and value in targets.tensors:
                    slots[key] = targets.result(value)
        engine.optimizer.load_state_dict(skeleton)
    else:
        engine.masters.copy_from_model()  # DeepSpeed: without optimizer states, masters follow the module
        engine.partition.fence()
    if (
        restore_all
        and opts.lr_scheduler_states
        and engine.lr_scheduler is not None
        and es["lr_scheduler"] is not None
    ):
        engine.lr_scheduler.load_state_dict(es["lr_scheduler"])
    if restore_all:
        engine.loss_scaler.load_state_dict(es["loss_scaler"])
        restore_counters(engine, es["counters"])
        _restore_rank_state(engine, path)
    return es["client_state"]


def _restore_rank_state(engine: Any, path: Path) -> None:
    rank = _dist.rank()
    own = path / rank_file(rank)
    if own.is_file():
        rank_state = torch.load(own, map_location="cpu", weights_only=True)
        rng.restore(rank_state["rng"])
    else:
        # more ranks than saved the checkpoint: no RNG stream to continue; the dataloader is shared
        log_dist(
            f"{path} has no RNG state for rank {rank} (saved on fewer ranks); keeping this rank's RNG",
            ranks=None,
            level=logging.WARNING,
        )
        rank_state = torch.load(path / rank_file(0), map_location="cpu", weights_only=True)
    loader = engine.training_dataloader
    if loader is not None and rank_state.get("dataloader") is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(rank_state["dataloader"])
