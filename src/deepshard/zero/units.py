"""Which modules are ZeRO-3 units (``ShardGroup``\\ s), chosen by a policy the user may override.

A unit is a module whose parameters are gathered together before its forward and released after it.
The walk stops at a unit chosen by class (leaf or policy class): everything below it belongs to it.
Under ``min_params`` a unit may contain smaller units; each parameter belongs to the innermost one.
The root module is always the last unit and takes the parameters no other unit reaches.

Policy, first match wins:

1. modules marked with :func:`set_z3_leaf_modules` (DeepSpeed's API: data-dependent blocks such as
   mixture-of-experts layers, gathered whole so every rank issues the same collectives);
2. modules of the classes given to :func:`set_unit_modules` (or, with ``min_params=``, any module
   whose parameters not claimed by smaller units reach that count, as FSDP's size-based policy);
3. by default, *repeated blocks*: children of a ``ModuleList``/``Sequential`` whose class occurs
   there at least twice (transformer layers).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from torch import nn

_LEAF = "_z3_leaf"
_POLICY = "_deepshard_unit_policy"
_EXTERNAL = "_deepshard_external_params"


@dataclass(frozen=True)
class UnitPolicy:
    """Module classes (or class names) that are units, or a parameter-count threshold."""

    classes: tuple[type | str, ...] = ()
    min_params: int | None = None


def _matches(module: nn.Module, classes: Iterable[type | str]) -> bool:
    return any(
        (isinstance(c, str) and type(module).__name__ == c) or (isinstance(c, type) and isinstance(module, c))
        for c in classes
    )


def set_z3_leaf_modules(model: nn.Module, leaf_module_classes: Sequence[type | str]) -> list[nn.Module]:
    """Mark every module of these classes in ``model`` as a ZeRO-3 leaf (one unit, nothing inside it hooked).

    Returns the marked modules; raises when none matches (a typo would otherwise go unnoticed).
    """
    marked = [m for m in model.modules() if _matches(m, leaf_module_classes)]
    if not marked:
        names = [c if isinstance(c, str) else c.__name__ for c in leaf_module_classes]
        raise ValueError(f"set_z3_leaf_modules: no module of {names} found in {type(model).__name__}")
    for m in marked:
        setattr(m, _LEAF, True)
    return marked


def unset_z3_leaf_modules(model: nn.Module, leaf_module_classes: Sequence[type | str]) -> list[nn.Module]:
    """Undo :func:`set_z3_leaf_modules` for these classes; returns the modules unmarked."""
    unmarked = [m for m in model.modules() if _matches(m, leaf_module_classes) and getattr(m, _LEAF, False)]
    for m in unmarked:
        setattr(m, _LEAF, False)
    return unmarked


def z3_leaf_module(module: nn.Module) -> bool:
    """Whether ``module`` is marked as a ZeRO-3 leaf."""
    return bool(getattr(module, _LEAF, False))


def get_z3_leaf_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` marked as ZeRO-3 leaves."""
    return [m for m in model.modules() if z3_leaf_module(m)]


def set_unit_modules(
    model: nn.Module, classes: Sequence[type | str] = (), min_params: int | None = None
) -> None:
    """Choose ``model``'s ZeRO-3 units: modules of ``classes``, or subtrees of at least ``min_params``."""
    if not classes and min_params is None:
        raise ValueError("set_unit_modules needs module classes or min_params")
    if min_params is not None and min_params <= 0:
        raise ValueError(f"min_params must be positive, got {min_params}")
    setattr(model, _POLICY, UnitPolicy(tuple(classes), min_params))


def register_external_parameter(module: nn.Module, parameter: nn.Parameter) -> None:
    """Tell ZeRO-3 that ``module``'s forward uses ``parameter``, which another module owns (DeepSpeed's API).

    The unit that runs ``module`` then gathers ``parameter`` too.
    """
    if not isinstance(parameter, nn.Parameter):
        raise ValueError(f"register_external_parameter needs an nn.Parameter, got {type(parameter).__name__}")
    external = getattr(module, _EXTERNAL, None)
    if external is None:
        external = []
        setattr(module, _EXTERNAL, external)
    if all(p is not parameter for p in external):
        external.append(parameter)


def unregister_external_parameter(module: nn.Module, parameter: nn.Parameter) -> None:
    """Undo :func:`register_external_parameter`."""
    external = getattr(module, _EXTERNAL, [])
    external[:] = [p for p in external if p is not parameter]


def external_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Parameters registered as used by ``module`` (or any module below it)."""
    return [p for m in module.modules() for p in getattr(m, _EXTERNAL, [])]


def _repeated_blocks(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for container in model.modules():
        if isinstance(container, nn.ModuleList | nn.Sequential):
            children = list(container.children())
            for child in children:
                if sum(type(c) is type(child) for c in children) >= 2 and any(
                    True for _ in child.parameters()
                ):
                    ids.add(id(child))
    return ids


@dataclass
class UnitPlan:
    """Unit modules in order (root last), and the parameters each one reaches first."""

    modules: list[tuple[str, nn.Module]] = field(default_factory=list)
    params: list[list[nn.Parameter]] = field(default_factory=list)


def plan_units(model: nn.Module) -> UnitPlan:
    """Units of ``model`` under its policy; each parameter goes to the first unit (in order) reaching it."""
    policy: UnitPolicy | None = getattr(model, _POLICY, None)
    repeated = _repeated_blocks(model) if policy is None else set()

    def is_unit(module: nn.Module) -> bool:
        if z3_leaf_module(module):
            return True
        if policy is not None:
            return bool(policy.classes) and _matches(module, policy.classes)
        return id(module) in repeated

    chosen: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> int:
        """Collect units below ``module``; return the parameter count left unclaimed in its subtree."""
        own = sum(p.numel() for p in module.parameters(recurse=False))
        for name, child in module.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if is_unit(child):
                chosen.append((path, child))
                continue
            left = walk(path, child)
            if policy is not None and policy.min_params is not None and left >= policy.min_params:
                chosen.append((path, child))
            else:
                own += left
        return own

    walk("", model)
    # sort units by registration order of their modules
    order = {id(m): i for i, m in enumerate(model.modules())}
    chosen.sort(key=lambda item: order[id(item[1])])
    plan = UnitPlan(modules=[*chosen, ("<root>", model)])
    unit_ids = {id(m) for _, m in chosen}
    seen: set[int] = set()
    for _, module in plan.modules:
        params: list[nn.Parameter] = []
        for p in reachable_params(module, unit_ids):
            if id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        plan.params.append(params)
    return plan


def reachable_params(module: nn.Module, unit_ids: set[int]) -> list[nn.Parameter]:
    """Parameters of ``module``'s subtree, not descending into other units (tied ones included)."""
    out: list[nn.Parameter] = []
    stack = [module]
    while stack:
        m = stack.pop(0)
        out.extend(m.parameters(recurse=False))
        stack[:0] = [c for c in m.children() if id(c) not in unit_ids]
    return out
