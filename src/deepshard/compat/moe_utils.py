"""DeepSpeed's ``deepspeed.moe.utils``: telling expert parameters apart and grouping them for the optimizer.

DeepSpeed marks a Mixture-of-Experts expert parameter by setting ``param.allreduce = False`` and
``param.group_name = <its expert data-parallel group>`` (its ``MoE`` layer does this). These
functions read that convention, so a script that builds its optimizer groups with them runs
unchanged: with no expert parameters (deepshard has no MoE layer yet, ``deepspeed.moe.layer`` is
refused) every parameter stays in its original group, and parameters a user marked the DeepSpeed way
are split into per-expert-group entries as DeepSpeed does. deepshard reduces every group over the
data-parallel ranks (an expert group's data-parallel group is the whole world without expert
parallelism), so the split changes nothing numerically; it keeps the optimizer groups' structure
identical to DeepSpeed's (which matters for checkpoints and per-group hyper-parameters).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

DEFAULT_MAX_GROUP_SIZE = 178_956_971
"""DeepSpeed's cap on the elements of one split-off expert group (its ``max_group_size`` default)."""


def is_moe_param(param: torch.Tensor) -> bool:
    """Whether ``param`` is an expert parameter: DeepSpeed's marker ``param.allreduce`` is set and false."""
    return getattr(param, "allreduce", True) is False


def split_params_into_shared_and_expert_params(
    params: Iterable[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(shared, expert)``: ``params`` split by :func:`is_moe_param`, order kept."""
    shared: list[torch.Tensor] = []
    expert: list[torch.Tensor] = []
    for p in params:
        (expert if is_moe_param(p) else shared).append(p)
    return shared, expert


def split_params_grads_into_shared_and_expert_params(
    group: Iterable[torch.Tensor],
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``(shared_grads, expert_grads)``: the gradients of ``group``'s parameters that have one, split."""
    shared, expert = split_params_into_shared_and_expert_params(p for p in group if p.grad is not None)
    return [p.grad for p in shared if p.grad is not None], [p.grad for p in expert if p.grad is not None]


def _group_name(param: torch.Tensor) -> str:
    name = getattr(param, "group_name", None)
    if not isinstance(name, str):
        raise ValueError(
            f"an expert parameter (allreduce=False, shape {tuple(param.shape)}) has no string 'group_name' naming its "
            "expert data-parallel group; set param.group_name as DeepSpeed's MoE layer does."
        )
    return name


def _as_group_list(param_groups: Any) -> list[dict[str, Any]]:
    if isinstance(param_groups, dict):
        return [param_groups]
    if isinstance(param_groups, (list, tuple)) and all(isinstance(g, dict) for g in param_groups):
        return list(param_groups)
    raise ValueError(
        "split_params_into_different_moe_groups_for_optimizer needs a param-group dict or a list/tuple of them "
        f"(each {{'params': [...], 'name': ...}}), got {type(param_groups).__name__}"
    )


def _chunks(params: Sequence[torch.Tensor], max_numel: int | None) -> list[list[torch.Tensor]]:
    """``params`` cut, in order, into runs of at most ``max_numel`` elements (a larger tensor alone)."""
    if max_numel is None:
        return [list(params)]  # one group, even an empty one (as DeepSpeed)
    runs: list[list[torch.Tensor]] = []
    size = 0
    for p in params:
        if runs and size + p.numel() <= max_numel:
            runs[-1].append(p)
            size += p.numel()
        else:
            runs.append([p])
            size = p.numel()
    return runs


def split_params_into_different_moe_groups_for_optimizer(
    param_groups: dict[str, Any] | Sequence[dict[str, Any]],
    max_group_size: int | None = DEFAULT_MAX_GROUP_SIZE,
) -> tuple[dict[str, Any], ...]:
    """The optimizer groups with expert parameters moved into groups of their own, as DeepSpeed does.

    Each input group keeps its non-expert parameters. For every input group and every expert group
    name found (``param.group_name``), new groups are appended with the input group's options, the
    expert group's name as ``name``, ``moe: True``, and its expert parameters, cut into groups of at
    most ``max_group_size`` elements (none for an expert group without parameters here; ``None``: one
    group, possibly empty). The input groups are updated in place.
    """
    groups = _as_group_list(param_groups)
    for i, group in enumerate(groups):
        group["params"] = list(group["params"])
        group.setdefault("name", f"group{i}")
    expert_names = sorted({_group_name(p) for g in groups for p in g["params"] if is_moe_param(p)})
    appended: list[dict[str, Any]] = []
    for group in groups:
        options = {k: v for k, v in group.items() if k not in ("params", "name")}
        shared, expert = split_params_into_shared_and_expert_params(group["params"])
        group["params"] = shared
        for name in expert_names:
            mine = [p for p in expert if _group_name(p) == name]
            for run in _chunks(mine, max_group_size):
                appended.append({**options, "name": name, "moe": True, "params": run})
    return tuple(groups + appended)
