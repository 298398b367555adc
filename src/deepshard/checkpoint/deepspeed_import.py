"""Read a DeepSpeed ZeRO-1/2/3 checkpoint into whole tensors by parameter name, without DeepSpeed.

A DeepSpeed tag directory (``save_dir/global_stepN/``) holds::

    mp_rank_00_model_states.pt                     ZeRO-1/2: module state dict (training dtype),
                                                   parameter shapes in flat order, counters, LR schedule
    zero_pp_rank_R_mp_rank_00_model_states.pt      ZeRO-3 (one per rank): the same, module weights empty
    [bf16_]zero_pp_rank_R_mp_rank_00_optim_states.pt   rank R's fp32 master partition and optimizer state

ZeRO-1/2 (``single_partition_of_fp32_groups``): each optimizer group's trainable parameters are
flattened in ``param_shapes`` order, each followed by its ``param_alignment_paddings`` entry, the
whole padded to a multiple of ``2 * world`` and cut into ``world`` equal partitions; rank R saves
partition R without its tail padding (``group_paddings[g]`` elements). The base optimizer's state
(``exp_avg``, ``exp_avg_sq``; Adam's ``step`` per group) is one flat tensor per group over the
*padded* partition. ZeRO-3 (``fp32_flat_groups``): every parameter is split on its own into
``ceil(numel / world)``-element pieces, rank R holding piece R (the last one zero-padded); a rank's
flat buffer is its pieces of all parameters in ``param_shapes`` order, cut into sub-groups, and its
optimizer state has one flat tensor per sub-group in the same order.

:func:`read_deepspeed_checkpoint` un-flattens both into whole per-parameter tensors. Rank files are
streamed one at a time (memory-mapped, released before the next), so peak memory is the whole
result (fp32 weights, plus ``exp_avg`` and ``exp_avg_sq`` when the optimizer state is wanted) and
one rank's flat partition. Files are loaded by :func:`._restricted_load.load_restricted`: DeepSpeed
need not be installed, and none of the code a pickle names is run.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deepshard.checkpoint._restricted_load import StandIn, load_restricted
from deepshard.checkpoint.layout import DEEPSPEED_MODEL_FILES, is_deepspeed_checkpoint
from deepshard.checkpoint.manifest import CorruptCheckpointError

MODEL_FILE = DEEPSPEED_MODEL_FILES[0]
_ZERO3_MODEL_FILE = "zero_pp_rank_{}_mp_rank_00_model_states.pt"
_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")
# keys of DeepSpeed's model-states file that are not client state
_ENGINE_KEYS = frozenset(
    {
        "module",
        "buffer_names",
        "optimizer",
        "param_shapes",
        "frozen_param_shapes",
        "shared_params",
        "frozen_param_fragments",
        "lr_scheduler",
        "data_sampler",
        "random_ltd",
        "sparse_tensor_module_names",
        "skipped_steps",
        "global_steps",
        "global_samples",
        "dp_world_size",
        "mp_world_size",
        "ds_config",
        "ds_version",
        "checkpoint_parallel_dimensions",
        "universal_checkpoint_info",
    }
)

__all__ = ["DeepSpeedState", "GroupState", "is_deepspeed_checkpoint", "read_deepspeed_checkpoint"]


@dataclass
class GroupState:
    """One optimizer parameter group: its parameters by name, hyper-parameters, and scalar state (``step``)."""

    names: list[str]
    hyper: dict[str, Any]
    scalars: dict[str, Any]


@dataclass
class DeepSpeedState:
    """A DeepSpeed checkpoint as whole tensors by module state-dict name.

    ``weights`` holds every module entry once (trainable parameters in fp32 from the masters; frozen
    parameters and buffers as saved); ``aliases`` maps tied names to the name holding the tensor.
    ``optimizer`` holds the per-element optimizer state of each trainable parameter (empty when not
    read); ``groups`` the optimizer groups with their scalar state.
    """

    path: Path
    zero_stage: int
    world_size: int
    weights: dict[str, torch.Tensor]
    trainable: list[str]
    aliases: dict[str, str]
    order: list[str]
    optimizer: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    groups: list[GroupState] = field(default_factory=list)
    counters: dict[str, int] = field(default_factory=dict)
    lr_scheduler: dict[str, Any] | None = None
    loss_scaler: dict[str, Any] | None = None
    client_state: dict[str, Any] = field(default_factory=dict)
    bf16: bool = False
    fp16: bool = False


def _corrupt(path: Path, what: str) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"DeepSpeed checkpoint file {path} {what}; the checkpoint is corrupt or incomplete"
    )


def _optim_files(path: Path, world: int) -> list[Path]:
    found: dict[int, Path] = {}
    for entry in path.iterdir():
        m = _OPTIM_FILE.match(entry.name)
        if m is None:
            continue
        if int(m.group(2)) != 0:
            raise ValueError(
                f"{path} holds a model-parallel DeepSpeed checkpoint ({entry.name}); deepshard imports "
                "data-parallel ZeRO checkpoints only (mp_rank_00)."
            )
        found[int(m.group(1))] = entry
    if not found:
        raise ValueError(
            f"{path} holds no ZeRO optimizer files (*zero_pp_rank_*_optim_states.pt): deepshard imports DeepSpeed "
            "ZeRO stage 1, 2 and 3 checkpoints; a stage-0 checkpoint is not supported yet."
        )
    missing = [r for r in range(world) if r not in found]
    if missing or len(found) != world:
        raise CorruptCheckpointError(
            f"{path} was saved on {world} data-parallel ranks but holds optimizer files for ranks {sorted(found)}: "
            f"missing {[f'zero_pp_rank_{r}_mp_rank_00_optim_states.pt' for r in missing]}"
        )
    return [found[r] for r in range(world)]


def _numel(shape: Any) -> int:
    return int(math.prod(tuple(shape)))


def _stage_of(model_state: dict[str, Any], zero3_layout: bool) -> int:
    if zero3_layout:
        return 3
    zero = (model_state.get("ds_config") or {}).get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    return int(stage)


class _Assembler:
    """Whole flat tensors by (state key, parameter name), filled piece by piece from the rank files."""

    def __init__(self, numels: dict[str, int]) -> None:
        self.numels = numels
        self.out: dict[str, dict[str, torch.Tensor]] = {}
        self.filled: dict[str, dict[str, int]] = {}

    def put(self, key: str, name: str, start: int, piece: torch.Tensor) -> None:
        """Copy ``piece`` into elements ``[start, start + len)`` of ``name``'s flat ``key`` tensor."""
        if key not in self.out:
            self.out[key], self.filled[key] = {}, {}
        if name not in self.out[key]:
            self.out[key][name] = torch.empty(self.numels[name], dtype=piece.dtype)
            self.filled[key][name] = 0
        self.out[key][name][start : start + piece.numel()].copy_(piece.detach())
        self.filled[key][name] += piece.numel()

    def check(self, path: Path, keys: list[str]) -> None:
        for key in keys:
            for name, numel in self.numels.items():
                got = self.filled.get(key, {}).get(name, 0)
                if got != numel:
                    raise CorruptCheckpointError(
                        f"DeepSpeed checkpoint {path}: the rank partitions hold {got} of the {numel} elements of "
                        f"{key} of {name}; the partition files do not match the parameter shapes."
                    )


def _per_element(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and v.dim() > 0}


def _scalars(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if not (isinstance(v, torch.Tensor) and v.dim() > 0)}


def _base_groups(
    sd: dict[str, Any], base_key: str, count: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(state, hyper-parameters) of each of the base optimizer's ``count`` groups / sub-groups, in index order."""
    base = sd.get(base_key)
    if isinstance(base, list):  # ZeRO-1/2 "elastic" format: lean per-group states, one step for all
        step = sd.get("base_optimizer_state_step")
        states = [dict(s, **({"step": step} if step is not None and "step" not in s else {})) for s in base]
        return states, [{} for _ in base]
    if not isinstance(base, dict) or "state" not in base:
        raise KeyError(base_key)
    states = [base["state"].get(i, {}) for i in range(count)]
    return states, list(base.get("param_groups", []))


def _read_zero12(
    path: Path, files: list[Path], param_shapes: list[dict[str, Any]], asm: _Assembler, optimizer_states: bool
) -> list[GroupState]:
    groups: list[GroupState] = []
    offsets = [0] * len(param_shapes)  # start of this rank's partition in each group's flat buffer
    for rank, file in enumerate(files):
        try:
            sd = load_restricted(file)["optimizer_state_dict"]
            parts = sd["single_partition_of_fp32_groups"]
            paddings = sd["group_paddings"]
            aligns = sd.get("param_alignment_paddings") or [[0] * len(s) for s in param_shapes]
            states, hypers = (
                _base_groups(sd, "base_optimizer_state", len(parts)) if optimizer_states else ([], [])
            )
        except (KeyError, TypeError, IndexError) as exc:
            raise _corrupt(file, f"lacks the ZeRO-1/2 optimizer entry {exc}") from None
        if len(parts) != len(param_shapes):
            raise _corrupt(
                file, f"has {len(parts)} parameter groups, the model-states file {len(param_shapes)}"
            )
        for g, (shapes, lean) in enumerate(zip(param_shapes, parts)):
            lean = lean.reshape(-1)
            pieces = {"fp32": lean}
            if optimizer_states:
                pieces.update({k: v.reshape(-1)[: lean.numel()] for k, v in _per_element(states[g]).items()})
                if rank == 0:
                    groups.append(
                        GroupState(
                            list(shapes), dict(hypers[g]) if g < len(hypers) else {}, _scalars(states[g])
                        )
                    )
            lo, hi = offsets[g], offsets[g] + lean.numel()
            start = 0
            for (name, shape), pad in zip(shapes.items(), aligns[g]):
                n = _numel(shape)
                a, b = max(start, lo), min(start + n, hi)
                if a < b:
                    for key, flat in pieces.items():
                        asm.put(key, name, a - start, flat[a - lo : b - lo])
                start += n + int(pad)
            offsets[g] += lean.numel() + int(paddings[g])
        del sd, parts, states
    return groups


def _read_zero3(
    path: Path, files: list[Path], param_shapes: list[dict[str, Any]], asm: _Assembler, optimizer_states: bool
) -> list[GroupState]:
    world = len(files)
    groups: list[GroupState] = []
    order = [(name, _numel(shape)) for shapes in param_shapes for name, shape in shapes.items()]
    for rank, file in enumerate(files):
        try:
            sd = load_restricted(file)["optimizer_state_dict"]
            flat_groups = sd["fp32_flat_groups"]
            states, hypers = (
                _base_groups(sd, "optimizer_state_dict", len(flat_groups)) if optimizer_states else ([], [])
            )
        except (KeyError, TypeError, IndexError) as exc:
            raise _corrupt(file, f"lacks the ZeRO-3 optimizer entry {exc}") from None
        pieces = {"fp32": torch.cat([t.reshape(-1) for t in flat_groups])}
        if optimizer_states:
            keys = set(_per_element(states[0])) if states else set()
            for key in sorted(keys):
                pieces[key] = torch.cat([s[key].reshape(-1) for s in states])
            if rank == 0:
                if len(hypers) != len(param_shapes):
                    raise _corrupt(
                        file, f"has {len(hypers)} optimizer groups, the model-states file {len(param_shapes)}"
                    )
                for shapes, hyper in zip(param_shapes, hypers):
                    first = hyper["params"][0] if hyper.get("params") else 0
                    groups.append(GroupState(list(shapes), dict(hyper), _scalars(states[first])))
        offset = 0
        for name, n in order:
            chunk = math.ceil(n / world)
            lo = rank * chunk
            take = max(0, min(chunk, n - lo))
            if take:
                for key, flat in pieces.items():
                    asm.put(key, name, lo, flat[offset : offset + take])
            offset += chunk
        if offset != pieces["fp32"].numel():
            raise _corrupt(
                file, f"holds {pieces['fp32'].numel()} fp32 elements, the parameter shapes need {offset}"
            )
        del sd, flat_groups, states, pieces
    return groups


def _loss_scaler(file: Path) -> dict[str, Any] | None:
    sd = load_restricted(file).get("optimizer_state_dict", {})
    scaler = sd.get("loss_scaler")
    if isinstance(scaler, StandIn):
        return {k: v for k, v in vars(scaler).items() if k != "args"}
    return None


def read_deepspeed_checkpoint(path: str | Path, optimizer_states: bool = True) -> DeepSpeedState:
    """Read the DeepSpeed ZeRO checkpoint in the tag directory ``path`` into whole tensors.

    ``optimizer_states=False`` reads the fp32 weights only. Raises :class:`CorruptCheckpointError`
    naming the file when a file is missing, truncated or inconsistent with the others, and
    ``ValueError`` for checkpoints deepshard cannot import (model parallel, ZeRO stage 0).
    """
    path = Path(path)
    zero3_layout = not (path / MODEL_FILE).is_file()
    model_file = path / (_ZERO3_MODEL_FILE.format(0) if zero3_layout else MODEL_FILE)
    if (path / "mp_rank_01_model_states.pt").exists():
        raise ValueError(
            f"{path} holds a model-parallel DeepSpeed checkpoint; deepshard imports data-parallel "
            "ZeRO checkpoints only."
        )
    ms = load_restricted(model_file)
    try:
        param_shapes = list(ms["param_shapes"])
        world = int(ms["dp_world_size"])
        module = ms["module"]
    except (KeyError, TypeError) as exc:
        raise _corrupt(model_file, f"lacks the entry {exc}") from None
    if isinstance(param_shapes and param_shapes[0], (list, tuple)) or not all(
        isinstance(s, dict) for s in param_shapes
    ):
        raise _corrupt(model_file, "has param_shapes in an unknown layout")
    stage = _stage_of(ms, zero3_layout)
    files = _optim_files(path, world)
    numels = {name: _numel(shape) for shapes in param_shapes for name, shape in shapes.items()}
    asm = _Assembler(numels)
    read = _read_zero3 if stage == 3 else _read_zero12
    groups = read(path, files, param_shapes, asm, optimizer_states)
    asm.check(path, ["fp32"])
    shapes = {name: torch.Size(shape) for s in param_shapes for name, shape in s.items()}
    weights = {name: t.view(shapes[name]) for name, t in asm.out.get("fp32", {}).items()}
    optimizer: dict[str, dict[str, torch.Tensor]] = {}
    if optimizer_states:
        keys = [k for k in asm.out if k != "fp32"]
        asm.check(path, keys)
        optimizer = {name: {k: asm.out[k][name].view(shapes[name]) for k in keys} for name in numels}
    aliases = {str(k): str(v) for k, v in (ms.get("shared_params") or {}).items()}
    buffers = list(ms.get("buffer_names") or [])
    for name in buffers:
        if name in module:
            weights[name] = module[name].detach().clone()
    frozen = dict(ms.get("frozen_param_shapes") or {})
    if frozen:
        weights.update(_frozen(path, ms, module, frozen, stage, world))
    config = ms.get("ds_config") or {}
    return DeepSpeedState(
        path=path,
        zero_stage=stage,
        world_size=world,
        weights=weights,
        trainable=list(numels),
        aliases=aliases,
        order=[str(k) for k in module],
        optimizer=optimizer,
        groups=groups,
        counters={
            "global_steps": int(ms.get("global_steps", 0)),
            "global_samples": int(ms.get("global_samples", 0)),
            "skipped_steps": int(ms.get("skipped_steps", 0)),
        },
        lr_scheduler=ms.get("lr_scheduler"),
        loss_scaler=_loss_scaler(files[0]) if optimizer_states else None,
        client_state={k: v for k, v in ms.items() if k not in _ENGINE_KEYS},
        bf16=bool((config.get("bf16") or {}).get("enabled", False)),
        fp16=bool((config.get("fp16") or {}).get("enabled", False)),
    )


def _frozen(
    path: Path, ms: dict[str, Any], module: dict[str, Any], frozen: dict[str, Any], stage: int, world: int
) -> dict[str, torch.Tensor]:
    """Frozen parameters: whole in the module state at ZeRO-1/2; per-rank pieces at ZeRO-3."""
    if stage != 3:
        return {name: module[name].detach().clone() for name in frozen if name in module}
    fragments: dict[str, list[torch.Tensor]] = {name: [] for name in frozen}
    for rank in range(world):
        file = path / _ZERO3_MODEL_FILE.format(rank)
        rank_ms = ms if rank == 0 else load_restricted(file)
        for name in frozen:
            try:
                fragments[name].append(rank_ms["frozen_param_fragments"][name].reshape(-1).clone())
            except (KeyError, TypeError):
                raise _corrupt(file, f"lacks the frozen parameter fragment of {name}") from None
    return {
        name: torch.cat(fragments[name])[: _numel(shape)].view(torch.Size(shape))
        for name, shape in frozen.items()
    }
