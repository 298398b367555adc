"""Put a checkpoint back into an engine: the module, masters, optimizer state and the rest.

Every rank reads what it holds: with replicated (stage 0) state that is every tensor, so a checkpoint
saved on N ranks loads on any M. Tensors are read in place into the engine's own tensors by
``torch.distributed.checkpoint``; the optimizer's state is first allocated from the checkpoint's
metadata (it may not exist yet in a fresh optimizer), then handed to ``optimizer.load_state_dict``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from deepshard.checkpoint import _dist, rng
from deepshard.checkpoint.layout import ENGINE_STATE, rank_file
from deepshard.checkpoint.state import MASTER, MODEL, master_pairs, module_entries, optimizer_fqns
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


def read_into(path: Path, targets: dict[str, torch.Tensor], group: Any = None, no_dist: bool | None = None) -> None:
    """Read the checkpoint tensors named by ``targets``' keys into those tensors, in place."""
    if not targets:
        return
    no_dist = not _dist.initialized() if no_dist is None else no_dist
    with _dist.quiet_single_process():
        dcp.load(targets, storage_reader=dcp.FileSystemReader(str(path)), process_group=group, no_dist=no_dist)


def _check_shape(key: str, meta: TensorStorageMetadata, target: torch.Tensor, path: Path) -> None:
    if tuple(meta.size) != tuple(target.shape):
        raise ValueError(
            f"{key} has shape {tuple(meta.size)} in the checkpoint {path} but {tuple(target.shape)} in the model; "
            "the checkpoint was saved from a different model configuration."
        )


def _module_targets(engine: Any, path: Path, es: dict[str, Any], meta: dict[str, Any], opts: LoadOptions,
                    use_masters: bool) -> dict[str, torch.Tensor]:
    entries = module_entries(engine.module)
    saved = es["module"]
    saved_names = set(saved["keys"]) | set(saved["aliases"])
    current_names = set(entries.tensors) | set(entries.aliases)
    excluded = set(saved["excluded_frozen"])
    missing = sorted(current_names - saved_names - excluded)
    unexpected = sorted(saved_names - current_names)
    if opts.strict and (missing or unexpected):
        raise ValueError(
            f"the checkpoint {path} does not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}. Pass load_module_strict=False to load "
            "the matching entries only."
        )
    if missing or unexpected:
        log_dist(f"loading {path} non-strictly: missing {missing}, unexpected {unexpected}", ranks=[0],
                 level=logging.WARNING)
    separate = {n for n, p, m in master_pairs(engine) if m is not p}
    targets = {}
    for key, tensor in entries.tensors.items():
        source = saved["aliases"].get(key, key)
        if source not in saved["keys"]:
            continue
        # without separate masters the module parameter *is* the master: prefer the fp32 copy if saved
        dcp_key = MASTER + source if use_masters and key not in separate and MASTER + source in meta else MODEL + source
        _check_shape(dcp_key, meta[dcp_key], tensor, path)
        targets[dcp_key] = tensor.detach()
    return targets


def _optimizer_targets(engine: Any, path: Path, es: dict[str, Any], meta: dict[str, Any]
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """DCP targets for the optimizer state and a ``state_dict`` skeleton that refers to them by key."""
    saved = es["optimizer"]
    current = optimizer_fqns(engine)
    saved_groups = [g["params"] for g in saved["param_groups"]]
    if saved_groups != current:
        raise ValueError(
            f"the optimizer in {path} has parameter groups {[len(g) for g in saved_groups]} (sizes) that do not "
            f"match this optimizer's {[len(g) for g in current]} by parameter name; build the optimizer the same "
            "way, or pass load_optimizer_states=False."
        )
    tensor_of = {n: m for n, _, m in master_pairs(engine)}
    tensor_of.update({n: t for g, names in zip(engine.optimizer.param_groups, current) for n, t in zip(names, g["params"])})
    targets: dict[str, torch.Tensor] = {}
    state: dict[int, dict[str, Any]] = {}
    index = 0
    for names in current:
        for name in names:
            slots = saved["state"].get(name, {})
            if slots:
                state[index] = {}
            like = tensor_of[name]
            for key, slot in slots.items():
                if "value" in slot:
                    state[index][key] = slot["value"]
                    continue
                md = meta[slot["tensor"]]
                if tuple(md.size) == tuple(like.shape):
                    buf = torch.empty_like(like, dtype=md.properties.dtype)
                else:  # e.g. Adam's 0-d ``step``
                    buf = torch.empty(tuple(md.size), dtype=md.properties.dtype)
                targets[slot["tensor"]] = buf
                state[index][key] = slot["tensor"]
            index += 1
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": []} for g in saved["param_groups"]]
    index = 0
    for group, names in zip(groups, current):
        group["params"] = list(range(index, index + len(names)))
        index += len(names)
    return targets, {"state": state, "param_groups": groups}


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def load_into_engine(engine: Any, path: Path, opts: LoadOptions) -> dict[str, Any]:
    """Collective: restore ``engine`` from the verified checkpoint at ``path``; return the client state."""
    es = read_engine_state(path)
    meta = tensor_metadata(path)
    restore_all = not opts.module_only
    want_optimizer = restore_all and opts.optimizer_states and engine.optimizer is not None
    if want_optimizer and es["optimizer"] is None:
        log_dist(f"{path} holds no optimizer state; the optimizer starts fresh", ranks=[0], level=logging.WARNING)
        want_optimizer = False

    targets = _module_targets(engine, path, es, meta, opts, use_masters=want_optimizer)
    fallback: dict[str, torch.Tensor] = {}
    separate = [(n, m) for n, p, m in master_pairs(engine) if m is not p]
    if want_optimizer:
        for name, master in separate:
            source = es["module"]["aliases"].get(name, name)
            if MASTER + source in meta:
                targets[MASTER + source] = master.detach()
            elif MODEL + source in meta:  # saved without separate masters (fp32): its weights are fp32
                fallback[MODEL + source] = master.detach()
        opt_targets, skeleton = _optimizer_targets(engine, path, es, meta)
        targets.update(opt_targets)
    read_into(path, targets)
    read_into(path, fallback)
    if separate and not want_optimizer:
        engine.masters.copy_from_model()  # DeepSpeed: without optimizer states, masters follow the module

    if want_optimizer:
        for slots in skeleton["state"].values():
            for key, value in slots.items():
                if isinstance(value, str) and value in targets:
                    slots[key] = _local(targets[value])
        engine.optimizer.load_state_dict(skeleton)
    if restore_all and opts.lr_scheduler_states and engine.lr_scheduler is not None and es["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(es["lr_scheduler"])
    if restore_all:
        engine.loss_scaler.load_state_dict(es["loss_scaler"])
        for name, value in es["counters"].items():
            setattr(engine, name, int(value))
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
        log_dist(f"{path} has no RNG state for rank {rank} (saved on fewer ranks); keeping this rank's RNG",
                 ranks=None, level=logging.WARNING)
        rank_state = torch.load(path / rank_file(0), map_location="cpu", weights_only=True)
    loader = engine.training_dataloader
    if loader is not None and rank_state.get("dataloader") is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(rank_state["dataloader"])
