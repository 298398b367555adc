"""What a checkpoint holds, collected from an engine by fully-qualified name, and put back.

Tensors go to ``torch.distributed.checkpoint`` under flat keys:

* ``model.<fqn>``                  every entry of ``module.state_dict()`` in the module's dtype (tied
                                   weights once, under their first name; the other names are aliases);
* ``master.<fqn>``                 fp32 master weights when they are separate tensors (bf16/fp16);
* ``optim.state.<fqn>.<key>``      each optimizer state tensor (``exp_avg``, ``step``, ...) of the
                                   master for parameter ``<fqn>``.

A tensor is either a plain tensor (replicated: the same on every rank of the group, saved once) or a
``DTensor`` placed ``Shard(0)`` over the data-parallel mesh (a ZeRO shard: each rank writes its
rows; a load on any number of ranks reads the rows it needs). Everything that is not a tensor goes to
``engine_state.pt`` (rank 0) and ``rank_NNNNN.pt`` (per rank) as plain containers that
``torch.load(weights_only=True)`` accepts.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from deepshard.checkpoint import rng
from deepshard.checkpoint.layout import FORMAT_VERSION

MODEL = "model."
MASTER = "master."
OPTIM = "optim.state."


@dataclass
class Captured:
    """One save's content: DCP tensors by key, rank 0's engine state, this rank's own state."""

    tensors: dict[str, torch.Tensor]
    engine_state: dict[str, Any]
    rank_state: dict[str, Any]

    def staged(self) -> Captured:
        """A copy that training may not touch (for an asynchronous save): tensors copied to host memory."""
        return Captured(
            tensors={k: _host_copy(v) for k, v in self.tensors.items()},
            engine_state=copy.deepcopy(self.engine_state),
            rank_state=copy.deepcopy(self.rank_state),
        )

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data this rank holds for the save."""
        return sum(_local(t).numel() * t.element_size() for t in self.tensors.values())


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    if _local(t) is not t:  # DTensor: keep its placement; clone the local shard
        return t.detach().clone()
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


def module_entries(module: torch.nn.Module, exclude_frozen: bool = False) -> ModuleEntries:
    """The module's state by FQN; a tensor shared by several names is kept under its first name."""
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    extras: dict[str, Any] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for key, value in module.state_dict().items():
        if exclude_frozen and key in frozen:
            continue
        if not isinstance(value, torch.Tensor):
            extras[key] = value
            continue
        local = _local(value)
        ident = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape), local.stride(), local.dtype)
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


def _separate(pairs: Iterable[tuple[str, torch.nn.Parameter, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    return [(n, m) for n, p, m in pairs if m is not p]


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
    """Everything a resume needs, as references to the live tensors (copy with :meth:`Captured.staged`)."""
    entries = module_entries(engine.module, exclude_frozen)
    tensors: dict[str, torch.Tensor] = {MODEL + k: v.detach() for k, v in entries.tensors.items()}
    pairs = master_pairs(engine)
    sharded = [n for n, p, m in pairs if tuple(m.shape) != tuple(p.shape) and _local(m) is m]
    if sharded:
        # plain tensors are taken as replicated and de-duplicated by DCP: a shard must be a DTensor
        raise ValueError(
            f"the engine holds sharded master weights ({sharded[0]}, ...: ZeRO stage "
            f"{engine.zero_optimization_stage()}); checkpoints of ZeRO stages 1-3 are not supported yet. "
            "Use stage 0 to save, or save_16bit_model for the weights."
        )
    for name, master in _separate(pairs):
        tensors[MASTER + name] = master.detach()

    optimizer_state = None
    if engine.optimizer is not None:
        groups = []
        per_param: dict[str, dict[str, Any]] = {}
        for group, names in zip(engine.optimizer.param_groups, optimizer_fqns(engine)):
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": names})
            for tensor, name in zip(group["params"], names):
                slots: dict[str, Any] = {}
                for key, value in engine.optimizer.state.get(tensor, {}).items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"{OPTIM}{name}.{key}"] = value.detach()
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
        "counters": {
            "global_steps": engine.global_steps,
            "global_samples": engine.global_samples,
            "skipped_steps": engine.skipped_steps,
            "micro_steps": engine.micro_steps,
        },
        "module": {
            "keys": list(entries.tensors),
            "aliases": entries.aliases,
            "extras": entries.extras,
            "excluded_frozen": sorted(entries.frozen) if exclude_frozen else [],
        },
        "masters": [n for n, _ in _separate(pairs)],
        "optimizer": optimizer_state,
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "loss_scaler": engine.loss_scaler.state_dict(),
        "client_state": dict(client_state or {}),
    }
    rank_state = {
        "rng": rng.capture(),
        "dataloader": loader.state_dict() if loader is not None and hasattr(loader, "state_dict") else None,
    }
    return Captured(tensors, engine_state, rank_state)
