"""ZeRO-3 runs executed on the harness's ranks (not a test module: pickled by reference)."""

from __future__ import annotations

import os
from typing import Any

import torch
from engine_runs import _config, _global_batches, build_model

import deepshard
import deepshard.zero
from deepshard.testing.models import GPT, GPTConfig
from deepshard.testing.parity import rank_slice
from deepshard.zero import fragments

# four blocks, every parameter sharded (threshold 0), so that unit counts are easy to reason about
DEEP = GPTConfig(vocab_size=256, seq_len=32, d_model=64, n_layers=4, n_heads=4, qkv_bias=False)


def _stage3(**zero: Any) -> dict[str, Any]:
    return {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, **zero}}


def _batch(cfg: GPTConfig, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    world, rank = deepshard.comm.get_world_size(), deepshard.comm.get_rank()
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randint(0, cfg.vocab_size, (2 * world, cfg.seq_len), generator=g)
    return rank_slice((x, torch.roll(x, -1, 1)), rank, world)


def _deep_engine(**zero: Any) -> Any:
    torch.manual_seed(0)
    model = GPT(DEEP)
    engine, _, _, _ = deepshard.initialize(
        model=model, config=_config(1, deepshard.comm.get_world_size(), **_stage3(**zero))
    )
    return engine


def live_units(max_live_units: int) -> dict[str, Any]:
    """Train 3 steps with a live budget of the root + ``max_live_units - 1`` blocks; from inside every
    block's forward, count the groups whose storage holds whole values."""
    engine = _deep_engine()
    runtime = engine.partition.stage3
    root = runtime.groups[-1]
    block = runtime.groups[0].numel
    budget = root.numel + (max_live_units - 1) * block
    engine.partition.stage3.max_live = budget
    engine.partition.stage3.prefetch_numel = block
    seen: list[tuple[int, int]] = []
    own_resident: list[bool] = []

    def probe(module: torch.nn.Module, args: Any) -> None:
        # whole values in storage, or a gather in flight (its buffer holds the bytes already)
        resident = [g for g in runtime.groups if g.holds_values() or g.gathering]
        seen.append((len(resident), sum(g.numel for g in resident)))
        own_resident.append(all(torch.isfinite(p).all() for p in module.parameters()))

    for b in engine.module.blocks:
        b.register_forward_pre_hook(probe)
    for step in range(3):
        x, y = _batch(DEEP, step)
        engine.backward(engine(x, y))
        engine.step()
    between = len(runtime.resident_groups())
    return {
        "max_units": max(n for n, _ in seen),
        "max_numel": max(n for _, n in seen),
        "budget": budget,
        "own_resident": all(own_resident),
        "resident_between_steps": between,
        "prefetched": any(n == max_live_units for n, _ in seen),
    }


def count_gathers(max_reuse_distance: int, host_shm: bool) -> dict[str, Any]:
    """Gathers and all-gather collectives (counted at deepshard.comm) per training step."""
    os.environ["DEEPSHARD_HOST_SHM"] = "1" if host_shm else "0"
    try:
        engine = _deep_engine(stage3_max_reuse_distance=max_reuse_distance)
    finally:
        del os.environ["DEEPSHARD_HOST_SHM"]
    calls = {"n": 0, "checks": 0}
    original = deepshard.comm.all_gather_into_tensor

    def counting(output: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        # parameter gathers carry floats; the pre-gather checks exchange int64 unit indices
        calls["n" if output.is_floating_point() else "checks"] += 1
        return original(output, *args, **kwargs)

    per_step, gathers = [], []
    runtime = engine.partition.stage3
    deepshard.comm.all_gather_into_tensor = counting  # type: ignore[assignment]
    try:
        for step in range(3):
            calls["n"], before = 0, runtime.gathers
            x, y = _batch(DEEP, step)
            engine.backward(engine(x, y))
            engine.step()
            per_step.append(calls["n"])
            gathers.append(runtime.gathers - before)
    finally:
        deepshard.comm.all_gather_into_tensor = original  # type: ignore[assignment]
    return {
        "per_step": per_step,
        "gathers": gathers,
        "shared": engine.partition.shards_shared,
        "units": len(engine.partition.stage3.groups),
        "checks": calls["checks"],
        "params": sum(1 for _ in engine.module.parameters()),
    }


def memory_state(world: int) -> dict[str, Any]:
    """bf16 + Adam, every parameter sharded: model-state bytes after a step vs 16 psi / N."""
    torch.manual_seed(0)
    model = GPT(DEEP)
    psi = sum(p.numel() for p in model.parameters())
    engine, _, _, _ = deepshard.initialize(
        model=model, config=_config(1, world, bf16={"enabled": True}, **_stage3())
    )
    x, y = _batch(DEEP)
    engine.backward(engine(x, y))
    engine.step()
    mem = engine.memory_breakdown()
    return {
        "total": mem.total,
        "expected": 16 * psi / world,
        "parameters": mem.parameters,
        "resident": len(engine.partition.stage3.resident_groups()),
    }


def user_view() -> dict[str, Any]:
    """What user code sees outside forward/backward, GatheredParameters, fragments, eval."""
    torch.manual_seed(0)
    model = build_model(preset="odd")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    engine, _, _, _ = deepshard.initialize(
        model=model, config=_config(1, deepshard.comm.get_world_size(), **_stage3())
    )
    world, rank = deepshard.comm.get_world_size(), deepshard.comm.get_rank()
    out: dict[str, Any] = {}
    out["shapes_kept"] = {n: tuple(p.shape) for n, p in engine.module.named_parameters()} == shapes
    out["dtypes_kept"] = {n: p.dtype for n, p in engine.module.named_parameters()} == dtypes
    out["printed"] = "Block" in repr(engine.module)
    out["placeholder_nan"] = bool(torch.isnan(engine.module.blocks[0].fc.weight).all())
    try:
        with torch.no_grad():
            engine.module.blocks[0].fc.weight.mul_(2)
        out["write_error"] = ""
    except RuntimeError as exc:
        out["write_error"] = str(exc)
    rows = engine.module.state_dict()["blocks.0.fc.weight"]
    out["state_dict_rows"] = tuple(rows.shape)
    full = deepshard.zero.full_state_dict(engine.module)
    out["full_shape"] = tuple(full["blocks.0.fc.weight"].shape)
    fc = engine.module.blocks[0].fc.weight
    # fragment API reads the fp32 master (whole) and it equals the gathered value
    out["fragment_matches"] = bool(torch.equal(fragments.safe_get_full_fp32_param(fc), full["blocks.0.fc.weight"]))
    # GatheredParameters: values inside; rank 0 modifies, every rank adopts it
    with deepshard.zero.GatheredParameters(fc, modifier_rank=0):
        out["inside_finite"] = bool(torch.isfinite(fc).all())
        if rank == 0:
            fc.data.fill_(0.125)
    out["after_nan_again"] = bool(torch.isnan(fc).all())
    out["modified_everywhere"] = bool((fragments.safe_get_full_fp32_param(fc) == 0.125).all())
    # eval under no_grad: the same logits as a plain model loaded with the whole state
    x, y = _batch(engine.module.cfg)
    engine.eval()
    with torch.no_grad():
        loss = float(engine(x, y))
    plain = build_model(preset="odd")
    plain.load_state_dict(deepshard.zero.full_state_dict(engine.module))
    with torch.no_grad():
        out["eval_diff"] = abs(loss - float(plain(x, y)))
    out["resident_after_eval"] = len(engine.partition.stage3.resident_groups())
    out["world"] = world
    return out


class _SharedHead(torch.nn.Module):
    """Two blocks; the second uses the first one's weight through a plain attribute (not registered)."""

    def __init__(self, register: bool) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(2))
        self.blocks[1].borrowed = [self.blocks[0].weight]  # hidden from parameters()
        self.register = register

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.blocks[0](x))
        h = torch.tanh(self.blocks[1](h))
        return (h @ self.blocks[1].borrowed[0]).pow(2).mean()


def _train_inputs(engine: Any, inputs: Any) -> list[float]:
    """One step per input (this rank's); the loss averaged over ranks per step."""
    losses = []
    for x in inputs:
        loss = engine(x)
        engine.backward(loss)
        engine.step()
        total = loss.detach().clone()
        deepshard.comm.all_reduce(total)
        losses.append(float(total) / deepshard.comm.get_world_size())
    return losses


def external_parameter(register: bool) -> list[float]:
    """Train the _SharedHead model; with ``register`` the borrowed weight is declared to ZeRO-3."""
    torch.manual_seed(0)
    model = _SharedHead(register)
    # the borrowed weight is used in the root's own forward: declare it there
    if register:
        deepshard.zero.register_external_parameter(model, model.blocks[0].weight)
    engine, _, _, _ = deepshard.initialize(
        model=model, config=_config(1, deepshard.comm.get_world_size(), **_stage3())
    )
    world, rank = deepshard.comm.get_world_size(), deepshard.comm.get_rank()
    inputs = [torch.randn(4, 16, generator=torch.Generator().manual_seed(step)).chunk(world)[rank] for step in range(4)]
    return _train_inputs(engine, inputs)


def external_reference(world: int) -> list[float]:
    """The _SharedHead run in one process."""
    torch.manual_seed(0)
    model = _SharedHead(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    losses = []
    for step in range(4):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(4, 16, generator=g)
        loss = model(x)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def divergent_rank(mode: str) -> str:
    """Rank 1 leaves the common path; return the error this rank raised ("" when none)."""
    os.environ["DEEPSHARD_COLLECTIVE_TIMEOUT"] = "5"
    os.environ["DEEPSHARD_HOST_SHM"] = "0"  # gathers over gloo collectives, as across hosts
    try:
        engine = _deep_engine(stage3_max_reuse_distance=0, stage3_prefetch_bucket_size=1)
        rank = deepshard.comm.get_rank()
        x, y = _batch(DEEP)
        engine.backward(engine(x, y))  # one normal iteration: the trace is recorded
        engine.step()
        if mode == "skip_block":
            blocks = engine.module.blocks
            if rank == 1:  # this rank's forward loop skips block 1 (it is never called)
                engine.module.blocks = torch.nn.ModuleList([b for i, b in enumerate(blocks) if i != 1])
            try:
                engine.backward(engine(x, y))
                engine.step()
            except RuntimeError as exc:
                return f"{type(exc).__name__}: {exc}"
            finally:
                engine.module.blocks = blocks
        else:  # "extra_gather": rank 1 runs one block alone, a gather nobody else joins
            if rank == 1:
                try:
                    with torch.no_grad():
                        engine.module.blocks[2](torch.zeros(1, 4, DEEP.d_model))
                except RuntimeError as exc:
                    return f"{type(exc).__name__}: {exc}"
        return ""
    finally:
        del os.environ["DEEPSHARD_COLLECTIVE_TIMEOUT"], os.environ["DEEPSHARD_HOST_SHM"]


def skip_block_on_one_host() -> list[float]:
    """With shared memory, gathers are local copies: a rank skipping a block desynchronises nothing."""
    engine = _deep_engine()
    assert engine.partition.shards_shared
    rank, losses = deepshard.comm.get_rank(), []
    blocks = engine.module.blocks
    for step in range(3):
        x, y = _batch(DEEP, step)
        if rank == 1 and step == 1:
            engine.module.blocks = torch.nn.ModuleList([b for i, b in enumerate(blocks) if i != 1])
        loss = engine(x, y)
        engine.module.blocks = blocks
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))
    return losses


def unit_plan_names(preset_units: tuple[str, ...]) -> list[str]:
    """Unit names chosen for the test GPT under a class policy (empty: the default policy)."""
    from deepshard.zero.units import plan_units

    model = GPT(DEEP)
    if preset_units:
        deepshard.zero.set_unit_modules(model, preset_units)
    return [name for name, _ in plan_units(model).modules]


__all__ = ["_global_batches"]


def save_16bit(root: str) -> dict[str, Any]:
    """save_16bit_model at stage 3: refused without the gather switch, whole weights with it."""
    import safetensors.torch

    out: dict[str, Any] = {}
    for gather in (False, True):
        torch.manual_seed(0)
        model = build_model(preset="odd")
        extra = _stage3(stage3_gather_16bit_weights_on_model_save=gather)
        engine, _, _, _ = deepshard.initialize(
            model=model, config=_config(1, deepshard.comm.get_world_size(), **extra)
        )
        out[f"saved_{gather}"] = engine.save_16bit_model(root, "model.safetensors")
    full = deepshard.zero.full_state_dict(engine.module, cpu=True)
    if deepshard.comm.get_rank() == 0:
        saved = safetensors.torch.load_file(f"{root}/model.safetensors")
        out["equal"] = all(torch.equal(saved[k], full[k]) for k in saved) and "blocks.0.fc.weight" in saved
    return out


class _Router(torch.nn.Module):
    """A data-dependent block: the sign of its input picks one of two experts (mixture-of-experts style)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.experts[0 if float(x.detach().sum()) > 0 else 1](x))


class _Routed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_Router() for _ in range(2))
        self.head = torch.nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x).pow(2).mean()


def _routed_inputs(step: int, rank: int) -> torch.Tensor:
    # rank 0's inputs are positive, rank 1's negative: the ranks take different experts
    g = torch.Generator().manual_seed(50 + step)
    return torch.rand(2, 16, generator=g) * (1.0 if rank == 0 else -1.0)


def routed_training(leaf: bool) -> list[float] | str:
    """Experts as units (gathers over gloo); with ``leaf`` each router is one leaf unit instead."""
    os.environ["DEEPSHARD_HOST_SHM"] = "0"
    os.environ["DEEPSHARD_COLLECTIVE_TIMEOUT"] = "10"
    try:
        torch.manual_seed(0)
        model = _Routed()
        deepshard.zero.set_unit_modules(model, ["Linear"])
        if leaf:
            deepshard.zero.set_z3_leaf_modules(model, [_Router])
        engine, _, _, _ = deepshard.initialize(
            model=model, config=_config(1, deepshard.comm.get_world_size(), **_stage3())
        )
        return _train_inputs(engine, [_routed_inputs(step, deepshard.comm.get_rank()) for step in range(4)])
    except RuntimeError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        del os.environ["DEEPSHARD_HOST_SHM"], os.environ["DEEPSHARD_COLLECTIVE_TIMEOUT"]


def routed_reference(world: int) -> list[float]:
    """The same training in one process: the mean of the ranks' losses, each routed on its own input."""
    from engine_runs import LR

    torch.manual_seed(0)
    model = _Routed()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01, foreach=False)
    losses = []
    for step in range(4):
        loss = sum(model(_routed_inputs(step, r)) for r in range(world)) / world
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses
