"""Rank functions of the zero.Init tests: build models under zero.Init on every rank and report back.

Not a test module: functions here are pickled by reference and run on the harness's ranks.
"""

from __future__ import annotations

import gc
import threading
import time
from typing import Any

import psutil
import torch
from engine_runs import _config, _global_batches
from torch import nn

import deepshard
from deepshard.comm.host_shm import release_freed_heap
from deepshard.testing.models import GPT, PRESETS, GPTConfig
from deepshard.testing.parity import make_token_batches, train_engine
from deepshard.zero.gathered import full_state_dict
from deepshard.zero.init import Init
from deepshard.zero.layout import ShardSpec
from deepshard.zero.rows import LOCAL_ROWS

# ~45M parameters (180 MB in fp32), mostly in blocks: large enough for RSS to measure, quick to initialise
MEMORY_MODEL = GPTConfig(vocab_size=4096, seq_len=128, d_model=512, n_layers=14, n_heads=8)


def zero3_config(world: int, threshold: int = 100) -> dict[str, Any]:
    return _config(1, world, zero_optimization={"stage": 3, "stage3_param_persistence_threshold": threshold})


def rows_match(model: nn.Module, reference: nn.Module) -> list[str]:
    """Names of parameters whose rows (partitioned) or values (whole) differ from ``reference``'s."""
    rank, world = deepshard.comm.get_rank(), deepshard.comm.get_world_size()
    bad = []
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        rows = LOCAL_ROWS.get(p)
        if rows is None:
            ok = torch.equal(p.detach(), q.detach())
        else:
            start, end = ShardSpec(q.shape, world).row_range(rank)
            whole = q.detach().view(1) if q.dim() == 0 else q.detach()
            ok = (
                p.shape == q.shape
                and p.dtype == q.dtype
                and rows.dtype == q.dtype
                and torch.equal(rows, whole[start:end])
                and bool(torch.isnan(p).all())
            )
        if not ok:
            bad.append(name)
    return bad


def built_values_and_training() -> dict[str, Any]:
    """GPT "odd" built under zero.Init: its initial state equals a normal construction; then train."""
    world = deepshard.comm.get_world_size()
    cfg = zero3_config(world)
    torch.manual_seed(0)
    with Init(config_dict_or_path=cfg):
        model = GPT(PRESETS["odd"])
    partitioned = sorted(n for n, p in model.named_parameters() if p in LOCAL_ROWS)
    torch.manual_seed(0)
    plain = GPT(PRESETS["odd"])
    engine, _, _, _ = deepshard.initialize(model=model, config=cfg)
    initial = full_state_dict(engine.module)
    expected = plain.state_dict()
    differ = sorted(k for k in expected if k not in initial or not torch.equal(initial[k], expected[k]))
    losses = train_engine(engine, [step[0] for step in _global_batches(world, 1, "odd")])
    state = {k: v.float() for k, v in full_state_dict(engine.module).items()}
    return {"partitioned": partitioned, "differ": differ, "keys": sorted(initial) == sorted(expected),
            "losses": losses, "state": state}  # fmt: skip


class _Child(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(30, 7)
        self.conv = nn.Conv3d(6, 6, 3)
        self.e = nn.Linear(9, 9)
        self.sp = nn.Linear(12, 10)
        self.o = nn.Linear(13, 11)
        self.tn = nn.Parameter(torch.empty(10, 20))
        nn.init.trunc_normal_(self.tn, std=0.02)


class InitZoo(nn.Module):
    """Parent-level re-initialisation after the children were complete, with many torch.nn.init functions."""

    def __init__(self, half: bool = False) -> None:
        super().__init__()
        self.c = _Child()
        self.d = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.own = nn.Parameter(torch.randn(5, 5))  # the root's own: partitioned on exit
        self.scalar = nn.Parameter(torch.tensor(3.0))  # 0-d: one row
        c = self.c
        nn.init.trunc_normal_(c.tn, std=0.5, a=-0.1, b=0.1)  # the rejection-sampling path
        nn.init.trunc_normal_(c.a.weight, std=0.02)
        nn.init.xavier_uniform_(c.a.weight)
        nn.init.kaiming_normal_(c.e.weight)
        nn.init.orthogonal_(c.o.weight)
        nn.init.sparse_(c.sp.weight, 0.3)
        nn.init.dirac_(c.conv.weight)
        nn.init.eye_(c.e.weight)
        nn.init.constant_(c.e.bias, 0.3)
        nn.init.ones_(c.sp.bias)
        with torch.no_grad():
            c.a.weight.data.mul_(0.5)  # elementwise: applied to the rows
            nn.init.normal_(self.d[0].weight)
            nn.init.normal_(self.d[1].weight)
            self.d[0].weight.add_(torch.randn(8, 8))  # a full-size operand, cut to the rows
            self.d[0].weight.clamp_(min=torch.full((8, 1), -0.5), max=torch.full((8,), 0.4))
            self.d[1].weight.data.normal_()
            self.d[1].weight.data[2].zero_()  # an indexed write while the parameter is whole
            self.d[2].weight *= 2
            self.d[2].weight.masked_fill_(torch.arange(64).view(8, 8) % 3 == 0, 1.5)
            self.d[1].bias.copy_(self.d[1].weight[0])  # reads a whole (materialised) parameter
            self.scalar.mul_(2)
        if half:
            self.d.half()  # Module._apply on partitioned parameters converts their rows
            nn.init.normal_(self.d[2].weight)


def zoo_rows(half: bool) -> list[str]:
    """Build :class:`InitZoo` under zero.Init (threshold 1: nearly everything partitioned) and normally."""
    cfg = {"zero_optimization": {"stage3_param_persistence_threshold": 1}}
    torch.manual_seed(0)
    with Init(config_dict_or_path=cfg, dtype=torch.float16 if half else None):
        model = InitZoo(half)
    after = torch.rand(4)
    torch.manual_seed(0)
    reference = InitZoo(half)
    bad = rows_match(model, reference.half() if half else reference)
    if not torch.equal(after, torch.rand(4)):
        bad.append("random stream after construction")
    if sum(p in LOCAL_ROWS for p in model.parameters()) != len(list(model.parameters())):
        bad.append("not every parameter was partitioned")
    return bad


def construction_memory() -> dict[str, int]:
    """Peak RSS increase while building :data:`MEMORY_MODEL` under zero.Init (default threshold, fp32)."""
    gc.collect()
    release_freed_heap()
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        torch.manual_seed(0)
        with Init():
            model = GPT(MEMORY_MODEL)
    finally:
        stop.set()
        sampler.join()
    peak[0] = max(peak[0], proc.memory_info().rss)
    held = 0
    for p in model.parameters():
        rows = LOCAL_ROWS.get(p)
        held += rows.numel() * rows.element_size() if rows is not None else p.numel() * p.element_size()
    full = sum(p.numel() * 4 for p in model.parameters())
    result = {"full": full, "peak": peak[0] - base, "held": held}
    # and it trains: ZeRO-3 adopts the rows as its shards
    world = deepshard.comm.get_world_size()
    cfg = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "zero_optimization": {"stage": 3}}  # fmt: skip
    engine, _, _, _ = deepshard.initialize(model=model, config=cfg)
    batches = make_token_batches(MEMORY_MODEL.vocab_size, 16, world, 2, seed=3)
    result["losses"] = train_engine(engine, batches)  # type: ignore[assignment]
    result["model_state_after_init"] = engine.memory_breakdown().parameters
    engine.destroy()
    del model, engine
    gc.collect()
    release_freed_heap()
    return result


def seeded_by_rank() -> dict[str, Any]:
    """Ranks seeded differently: the model is rank 0's construction (DeepSpeed's rule: rank 0's values),
    and each rank's own torch generator is back after the context (rank 1 draws what it would have)."""
    rank = deepshard.comm.get_rank()
    torch.manual_seed(0)
    reference = GPT(PRESETS["odd"])
    torch.manual_seed(rank)
    own_next = torch.get_rng_state()
    with Init(config_dict_or_path={"zero_optimization": {"stage3_param_persistence_threshold": 100}}):
        model = GPT(PRESETS["odd"])
    after = torch.get_rng_state()
    partitioned = sum(p in LOCAL_ROWS for p in model.parameters())
    return {"bad": rows_match(model, reference), "partitioned": partitioned,
            "own_generator_back": torch.equal(after, own_next) if rank else None}  # fmt: skip


def diverging_outside_torch_generator() -> str:
    """Values that differ through another source of randomness (Python's ``random``): refused on exit."""
    import random

    random.seed(deepshard.comm.get_rank())
    try:
        with Init(config_dict_or_path={"zero_optimization": {"stage3_param_persistence_threshold": 100}}):
            model = GPT(PRESETS["odd"])
            with torch.no_grad():
                model.tok.weight.mul_(1.0 + random.random())
    except RuntimeError as exc:
        return str(exc)
    return "no error"


class _Uninitialised(nn.Module):
    """``nn.Linear(64, 48)``'s parameters from ``torch.empty``, never filled (Hugging Face's no-init build)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(48, 64))
        self.bias = nn.Parameter(torch.empty(48))


def uninitialised_then_filled_by_rank0(path: str) -> dict[str, Any]:
    """The Hugging Face loading pattern: build with ``torch.empty`` (no init) under zero.Init, then fill
    each module from a file inside ``GatheredParameters(modifier_rank=0)`` on rank 0 only."""
    from deepshard.zero.gathered import GatheredParameters

    rank = deepshard.comm.get_rank()
    torch.manual_seed(100 + rank)  # nothing here may depend on the seed
    saved = torch.load(path)
    config = {"zero_optimization": {"stage3_param_persistence_threshold": 100}}
    junk = torch.full((48 * 64,), float(rank + 1))  # freed memory torch.empty may hand out again: differs by rank
    del junk
    with Init(config_dict_or_path=config):
        model = _Uninitialised()
    inside_equal = []
    for name, p in model.named_parameters():
        with GatheredParameters([p], modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    p.copy_(saved[name])
        with GatheredParameters([p]):
            inside_equal.append(torch.equal(p.detach(), saved[name]))
    reference = nn.Linear(64, 48)
    reference.load_state_dict(saved)
    return {"bad": rows_match(model, reference), "inside_equal": inside_equal,
            "partitioned": sum(p in LOCAL_ROWS for p in model.parameters())}  # fmt: skip


def convert_existing() -> list[str]:
    """``Init(module=model)`` on a normally built model keeps its values (as rows)."""
    torch.manual_seed(0)
    model = GPT(PRESETS["odd"])
    torch.manual_seed(0)
    reference = GPT(PRESETS["odd"])
    Init(module=model, config_dict_or_path={"zero_optimization": {"stage3_param_persistence_threshold": 100}})
    bad = rows_match(model, reference)
    if not any(p in LOCAL_ROWS for p in model.parameters()):
        bad.append("nothing was partitioned")
    return bad
