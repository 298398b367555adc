"""Which modules each ``different_groups`` entry selects, resolved as DeepSpeed's ``get_compress_methods``.

A pattern selects, in ``model.named_modules()`` order, every *compressible* module (``nn.Linear``,
``nn.Conv2d``, ``nn.Embedding``, ``nn.BatchNorm2d`` and their compressed forms) whose qualified name
``re.search``-es it; ``"*"`` (DeepSpeed's default, which its ``re.search`` cannot compile) selects every
compressible module. Within one technique a module may belong to one group only (a second claim is an
error, as DeepSpeed's). ``related_modules`` patterns are resolved without that exclusivity and are paired
with the selected modules by position: the j-th match of a related pattern consumes the outputs of the
j-th match of its ``modules`` pattern (e.g. layer j's ``query`` for layer j's ``attention.output.dense``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from deepshard.compression.layers import Technique
from deepshard.config._compression import CompressionConfig

COMPRESSIBLE = (nn.Linear, nn.Conv2d, nn.Embedding, nn.BatchNorm2d)


@dataclass
class GroupPlan:
    """One group of one technique, resolved against a model."""

    technique: Technique
    name: str
    params: dict[str, Any]  # the group's ``params``
    modules: list[list[str]]  # per ``modules`` pattern, the names it selected
    related: list[list[list[str]]] = field(default_factory=list)  # per pattern, per related pattern, names


def select(model: nn.Module, pattern: str, where: str) -> list[str]:
    """Names of the compressible modules of ``model`` that ``pattern`` selects (``where`` names it in errors)."""
    names = [n for n, m in model.named_modules() if n and isinstance(m, COMPRESSIBLE)]
    if pattern == "*":
        return names
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ValueError(
            f"{where}: '{pattern}' is not a regular expression ({exc}); escape it or use '*'."
        ) from None
    return [n for n in names if regex.search(n)]


def plan(model: nn.Module, config: CompressionConfig) -> list[GroupPlan]:
    """Every enabled technique's groups, resolved against ``model``.

    Raises ``ValueError`` when a pattern selects nothing (a typo would otherwise compress nothing), when a
    module is claimed by two groups of one technique, or when related modules do not pair up.
    """
    plans: list[GroupPlan] = []
    for technique in Technique:
        section = getattr(config, technique.value)
        if not section.shared_parameters.enabled:
            continue
        taken: dict[str, str] = {}
        for group_name, group in section.different_groups.items():
            where = f"compression_training.{technique.value}.different_groups.{group_name}"
            per_pattern: list[list[str]] = []
            for pattern in group.modules:
                found = select(model, pattern, f"{where}.modules")
                if not found and pattern != "*":
                    raise ValueError(
                        f"{where}.modules: '{pattern}' selects no Linear/Conv2d/Embedding/BatchNorm2d "
                        f"module; names look like {select(model, '*', where)[:4]}."
                    )
                for name in found:
                    if name in taken:
                        raise ValueError(
                            f"{where}: module '{name}' is already in group '{taken[name]}' of "
                            f"{technique.value}; a module may join one group per technique."
                        )
                    taken[name] = group_name
                per_pattern.append(found)
            gp = GroupPlan(technique, group_name, group.params.model_dump(), per_pattern)
            for i, patterns in enumerate(group.related_modules or []):
                rel = [select(model, p, f"{where}.related_modules") for p in patterns]
                for p, names in zip(patterns, rel):
                    if len(names) != len(per_pattern[i]):
                        raise ValueError(
                            f"{where}.related_modules: '{p}' selects {len(names)} modules but '{group.modules[i]}' "
                            f"selects {len(per_pattern[i])}; each pruned module needs one related module per pattern."
                        )
                gp.related.append(rel)
            plans.append(gp)
    return plans
