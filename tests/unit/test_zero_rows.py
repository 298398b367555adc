"""The per-parameter registries that replace attributes glued onto parameters (deepshard.zero.rows)."""

from __future__ import annotations

import gc

import torch

from deepshard.zero.rows import ParamRegistry


def test_registry_keys_by_identity_not_value() -> None:
    reg: ParamRegistry[str] = ParamRegistry("test")
    a = torch.nn.Parameter(torch.ones(3))
    b = torch.nn.Parameter(torch.ones(3))  # equal values, another parameter
    reg.set(a, "a")
    assert a in reg and b not in reg
    assert reg.get(a) == "a" and reg.get(b) is None
    assert reg.pop(b) is None and reg.pop(a) == "a" and a not in reg
    assert not hasattr(a, "_deepshard_local_rows")  # nothing is glued onto the parameter


def test_registry_holds_parameters_weakly() -> None:
    reg: ParamRegistry[torch.Tensor] = ParamRegistry("test")
    p = torch.nn.Parameter(torch.zeros(4))
    reg.set(p, torch.zeros(2))
    del p
    gc.collect()
    assert "0 entries" in repr(reg)
