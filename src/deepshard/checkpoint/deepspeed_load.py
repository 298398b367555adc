"""Resume a deepshard engine from a DeepSpeed ZeRO-1/2/3 checkpoint, at any world size and ZeRO stage.

Every rank reads the DeepSpeed files itself (:func:`.deepspeed_import.read_deepspeed_checkpoint`,
no collectives) into whole per-parameter tensors, then keeps the rows it owns in this engine's
layout: its dim-0 rows of the fp32 masters and of the optimizer state at stages 1-3 (and of the
module's sharded parameters at stage 3), all of them at
stage 0 or on one rank. The trade-off: each rank briefly holds the whole fp32 weights and Adam
moments (plus one DeepSpeed rank file), which is what lets any DeepSpeed world size and stage load
into any deepshard one without a resharding step.

With optimizer states the masters are the source of every trainable parameter and are published
into the module (cast, all-gathered at stages 1-2) exactly as after an optimizer step; without
them the module is written from DeepSpeed's fp32 weights and the masters follow it, as DeepSpeed
does. The LR schedule (DeepSpeed's and deepshard's ``state_dict`` agree), the counters and an fp16
loss scale are restored too. DeepSpeed saves no RNG state: every rank keeps its own.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from deepshard.checkpoint import _dist
from deepshard.checkpoint.deepspeed_import import DeepSpeedState, read_deepspeed_checkpoint
from deepshard.checkpoint.load import LoadOptions, check_module_match
from deepshard.checkpoint.manifest import CorruptCheckpointError
from deepshard.checkpoint.state import (
    RowShard,
    master_pairs,
    module_entries,
    module_row_shards,
    optimizer_fqns,
    restore_counters,
    row_shards,
)
from deepshard.utils.logging import log_dist

# optimizer group keys that choose an implementation, not a value: the loading engine's are kept
_IMPLEMENTATION_KEYS = frozenset({"params", "foreach", "fused", "capturable", "differentiable"})


def _read_everywhere(path: Path, optimizer_states: bool) -> DeepSpeedState:
    """Collective: read the checkpoint on every rank; a failure on any rank is raised on all."""
    state, error = None, None
    try:
        state = read_deepspeed_checkpoint(path, optimizer_states)
    except (CorruptCheckpointError, ValueError) as exc:
        error = (isinstance(exc, CorruptCheckpointError), str(exc))
    errors = [e for e in _dist.all_gather_objects(error) if e]
    if errors:
        corrupt, message = errors[0]
        raise (CorruptCheckpointError if corrupt else ValueError)(message)
    assert state is not None
    return state


def _source(state: DeepSpeedState, key: str) -> str | None:
    """The name under which the DeepSpeed checkpoint holds module entry ``key`` (tied names resolved)."""
    if key in state.weights:
        return key
    target = state.aliases.get(key)
    if target in state.weights:
        return target
    for alias, name in state.aliases.items():  # DeepSpeed kept the tensor under our alias's name
        if name == key and alias in state.weights:
            return alias
    return None


def _module_sources(engine: Any, state: DeepSpeedState, opts: LoadOptions) -> dict[str, str]:
    entries = module_entries(engine.module)
    current = set(entries.tensors) | set(entries.aliases)
    saved = set(state.weights) | set(state.aliases)
    check_module_match(
        f"the DeepSpeed checkpoint {state.path}", sorted(current - saved), sorted(saved - current), opts.strict
    )
    module_rows = module_row_shards(engine)  # ZeRO-3: the module holds rows of tensors of this shape
    out = {}
    for key, tensor in entries.tensors.items():
        source = _source(state, key)
        if source is None:
            continue
        shape = module_rows[key].shape if key in module_rows else tensor.shape
        if tuple(state.weights[source].shape) != tuple(shape):
            raise ValueError(
                f"{key} has shape {tuple(state.weights[source].shape)} in the DeepSpeed checkpoint {state.path} but "
                f"{tuple(shape)} in the model; the checkpoint was saved from a different model configuration."
            )
        out[key] = source
    return out


def _rows(full: torch.Tensor, like: torch.Tensor, shard: RowShard | None) -> torch.Tensor:
    """This rank's part of ``full`` shaped like ``like``: dim-0 ``shard.rows`` (a 0-d tensor is one row)."""
    if shard is None:
        return full.reshape(like.shape)
    start, end = shard.rows
    return (full.reshape(1) if full.dim() == 0 else full)[start:end].reshape(like.shape)


def _optimizer_state_dict(
    engine: Any, state: DeepSpeedState, sources: dict[str, str], shards: dict[str, RowShard]
) -> dict[str, Any]:
    """``engine.optimizer.load_state_dict`` input: this rank's rows of DeepSpeed's state, groups matched by name."""
    current = optimizer_fqns(engine)
    ours = {theirs: name for name, theirs in sources.items()}
    saved = [[ours.get(n, n) for n in g.names] for g in state.groups]
    if [sorted(g) for g in saved] != [sorted(g) for g in current]:
        raise ValueError(
            f"the optimizer in the DeepSpeed checkpoint {state.path} has parameter groups {[len(g) for g in saved]} "
            f"(sizes) that do not match this optimizer's {[len(g) for g in current]} by parameter name; build the "
            "optimizer the same way, or pass load_optimizer_states=False."
        )
    per_state: dict[int, dict[str, Any]] = {}
    param_groups = []
    index = 0
    for group, names, ds_group in zip(engine.optimizer.param_groups, current, state.groups):
        hyper = {k: v for k, v in group.items() if k != "params"}
        hyper.update(
            {k: v for k, v in ds_group.hyper.items() if k in hyper and k not in _IMPLEMENTATION_KEYS}
        )
        first = index
        for tensor, name in zip(group["params"], names):
            slots: dict[str, Any] = {
                k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in ds_group.scalars.items()
            }
            for key, full in state.optimizer.get(sources.get(name, name), {}).items():
                slots[key] = _rows(full, tensor, shards.get(name)).clone()
            per_state[index] = slots
            index += 1
        param_groups.append({**hyper, "params": list(range(first, index))})
    return {"state": per_state, "param_groups": param_groups}


def _restore_loss_scale(engine: Any, state: DeepSpeedState) -> None:
    scaler, saved = engine.loss_scaler, state.loss_scaler
    if saved is None:
        return
    if state.fp16 and scaler.dynamic == bool(saved.get("dynamic", False)):
        scaler.load_state_dict(
            {
                "scale": float(saved.get("cur_scale", scaler.scale)),
                "cur_iter": int(saved.get("cur_iter", scaler.cur_iter)),
                "last_overflow_iter": int(saved.get("last_overflow_iter", scaler.last_overflow_iter)),
                "cur_hysteresis": int(saved.get("cur_hysteresis", scaler.cur_hysteresis)),
            }
        )
    elif state.fp16 or scaler.enabled:
        log_dist(
            f"{state.path}: the loss scaler of the DeepSpeed run ({'fp16' if state.fp16 else 'none'}) does not "
            "fit this engine's; keeping this engine's loss scale",
            ranks=[0],
            level=logging.WARNING,
        )


@torch.no_grad()
def load_deepspeed_into_engine(engine: Any, path: Path, opts: LoadOptions) -> dict[str, Any]:
    """Collective: restore ``engine`` from the DeepSpeed tag directory ``path``; return its client state."""
    restore_all = not opts.module_only
    want_optimizer = restore_all and opts.optimizer_states and engine.optimizer is not None
    state = _read_everywhere(path, want_optimizer)
    sources = _module_sources(engine, state, opts)
    shards = row_shards(engine)
    pairs = master_pairs(engine)
    trainable = {name for name, _, _ in pairs if name in sources} if want_optimizer else set()
    missing_moments = [n for n in trainable if sources[n] not in state.optimizer]
    if missing_moments:
        raise ValueError(
            f"the DeepSpeed checkpoint {path} has no optimizer state for {sorted(missing_moments)[:8]}; "
            "pass load_optimizer_states=False."
        )
    engine.partition.begin_update()  # no rank still reads parameters that this load overwrites
    module_rows = module_row_shards(engine)  # ZeRO-3: the module holds this rank's rows
    for key, tensor in module_entries(engine.module).tensors.items():
        if key in sources and key not in trainable:
            tensor.copy_(_rows(state.weights[sources[key]], tensor, module_rows.get(key)))
    if want_optimizer:
        for name, _, master in pairs:
            if name in trainable:
                master.copy_(_rows(state.weights[sources[name]], master, shards.get(name)))
        engine.partition.publish()  # masters -> whole module parameters (cast; all-gathered at stages 1-2)
        engine.optimizer.load_state_dict(_optimizer_state_dict(engine, state, sources, shards))
    else:
        engine.masters.copy_from_model()  # DeepSpeed: without optimizer states, masters follow the module
        engine.partition.fence()
    if restore_all and opts.lr_scheduler_states and engine.lr_scheduler is not None and state.lr_scheduler:
        engine.lr_scheduler.load_state_dict(dict(state.lr_scheduler))
    if restore_all:
        _restore_loss_scale(engine, state)
        restore_counters(engine, state.counters)
        # DeepSpeed saves at accumulation boundaries and keeps no micro-step count
        engine.micro_steps = state.counters["global_steps"] * engine.gradient_accumulation_steps()
    log_dist(
        f"imported the DeepSpeed ZeRO-{state.zero_stage} checkpoint {path} (saved on {state.world_size} ranks; "
        f"optimizer state {'restored' if want_optimizer else 'not loaded'}; no RNG state in DeepSpeed checkpoints)",
        ranks=[0],
    )
    return dict(state.client_state)
