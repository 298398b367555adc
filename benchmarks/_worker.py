"""One rank of one data-parallel training benchmark job (launched by ``bench_dp.py`` through torchrun).

Every contender trains the same GPT on the same token batches with the same optimizer (AdamW,
lr 1e-4, weight decay 0.01, no gradient clipping), so that they do the same work per step:

* ``deepshard``: ``deepshard.initialize`` with a ds_config (stage 0 unless ``--extra-config`` sets
  ``zero_optimization.stage``; AdamW from the config);
* ``deepspeed``: ``deepspeed.initialize`` with the *same* ds_config;
* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` (``gradient_as_bucket_view=True``) and
  ``torch.optim.AdamW(fused=True)``; bf16 is autocast with fp32 parameters, the stock recipe.
* ``fsdp2``: PyTorch FSDP2, ``torch.distributed.fsdp.fully_shard`` on every ``Block`` and then on
  the root (which holds the embeddings, the final norm and the head tied to the token embedding),
  ``reshard_after_forward`` at its default, over a 1-D CPU device mesh on the gloo group; the
  ZeRO-3 peer. bf16 is ``MixedPrecisionPolicy(param_dtype=bfloat16, reduce_dtype=float32)`` over fp32
  sharded parameters (the counterpart of bf16 with fp32 master weights); the optimizer is
  ``torch.optim.AdamW(fused=True)`` on the sharded (DTensor) parameters. It ignores the ds_config.

Every contender builds the full model on every rank first (no ``zero.Init``-style construction), so
the peak RSS of the sharding contenders includes one full fp32 copy of the model at start-up.

After ``--warmup`` untimed steps, ``--steps`` steps are timed between two barriers. Rank 0 writes one
JSON file with the global tokens/s, per-phase times (forward / backward incl. gradient reduction /
optimizer step, each rank's own clock), the ds_config in force (deepshard and DeepSpeed) and, per
rank, its pid (so the driver can map its outside RSS samples to ranks) and its ``ru_maxrss``.

``--print-config`` starts no process group and trains nothing: it prints the merged ds_config that
``--impl`` would get (``null`` for DDP / FSDP2) and, for deepshard, whether
``deepshard.config.load_config`` accepts it, as one JSON line (``bench_dp.py --dry-run`` uses it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from deepshard.testing.models import GPT, PRESETS
from deepshard.testing.parity import make_token_batches, rank_slice

LR = 1e-4
WEIGHT_DECAY = 0.01


def ds_config(dtype: str, micro_batch: int, world: int) -> dict[str, Any]:
    """The ds_config shared by deepshard and DeepSpeed (stage 0, AdamW from the config, no clipping)."""
    return {
        "train_batch_size": micro_batch * world,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "steps_per_print": 1_000_000,
        "zero_optimization": {"stage": 0},
        "bf16": {"enabled": dtype == "bf16"},
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY}},
    }


class _Contender:
    """``forward``/``backward``/``step`` of one implementation, so that the timing loop is shared."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What actually runs (recorded in the result, so that a run shows e.g. the ZeRO stage in force)."""
        return {"optimizer": type(getattr(self, "optimizer", None)).__name__}


class _Engine(_Contender):
    """deepshard and DeepSpeed share DeepSpeed's engine API."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.engine(x, y)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> None:
        self.engine.step()

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"optimizer": type(getattr(self.engine, "optimizer", None)).__name__}
        with contextlib.suppress(Exception):
            out["zero_stage"] = self.engine.zero_optimization_stage()
        basic = getattr(self.engine, "basic_optimizer", None)  # DeepSpeed: e.g. DeepSpeedCPUAdam with offload
        if basic is not None:
            out["basic_optimizer"] = type(basic).__name__
        builder = sys.modules.get("deepspeed.ops.op_builder.builder")
        if builder is not None:  # the DeepSpeed ops this rank loaded (JIT-built on first use ever)
            out["deepspeed_ops_loaded"] = sorted(getattr(builder.OpBuilder, "_loaded_ops", {}))
        return out


class _TorchLoop(_Contender):
    """A wrapped module trained by the plain PyTorch loop with fused AdamW (DDP and FSDP2)."""

    autocast = False

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, fused=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.autocast else contextlib.nullcontext()
        with ctx:
            return self.model(x, y)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


class _DDP(_TorchLoop):
    def __init__(self, model: torch.nn.Module, dtype: str) -> None:
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(DistributedDataParallel(model, gradient_as_bucket_view=True))
        self.autocast = dtype == "bf16"


class _FSDP2(_TorchLoop):
    """FSDP2: one ``fully_shard`` unit per transformer block, then the root for the remaining parameters.

    The tied head / token-embedding weight is one parameter of the root unit, so it is sharded,
    gathered and reduced once. The optimizer steps on the local shards of the DTensor parameters.
    """

    def __init__(self, model: torch.nn.Module, dtype: str, world: int) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        kwargs: dict[str, Any] = {"mesh": init_device_mesh("cpu", (world,))}
        if dtype == "bf16":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for block in model.blocks:  # type: ignore[union-attr]
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        super().__init__(model)  # the optimizer steps the local shards of the DTensor parameters


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def engine_config(
    impl: str, dtype: str, micro_batch: int, world: int, extra: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """The ds_config ``impl`` is built with: the shared one merged with ``extra``; None for DDP / FSDP2."""
    if impl not in ("deepshard", "deepspeed"):
        return None
    return _merge(ds_config(dtype, micro_batch, world), extra or {})


def check_config(impl: str, config: dict[str, Any] | None, world: int) -> dict[str, Any]:
    """For deepshard: whether its config loader accepts ``config`` (no engine is built)."""
    if impl != "deepshard" or config is None:
        return {}
    from deepshard.config import load_config

    try:
        load_config(config, dp_world_size=world)
    except Exception as err:  # noqa: BLE001 - reported, not handled
        return {"deepshard_load_config": f"{type(err).__name__}: {err}"}
    return {"deepshard_load_config": "ok"}


def build(
    impl: str,
    dtype: str,
    model: torch.nn.Module,
    micro_batch: int,
    world: int,
    extra: dict[str, Any] | None = None,
) -> _Contender:
    config = engine_config(impl, dtype, micro_batch, world, extra)
    if impl == "deepshard":
        import deepshard

        engine, _, _, _ = deepshard.initialize(
            model=model, model_parameters=model.parameters(), config=config
        )
        return _Engine(engine)
    if impl == "deepspeed":
        import deepspeed

        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=model.parameters(), config=config
        )
        return _Engine(engine)
    if impl == "ddp":
        return _DDP(model, dtype)
    if impl == "fsdp2":
        return _FSDP2(model, dtype, world)
    raise ValueError(f"unknown --impl {impl!r}; expected deepshard, deepspeed, ddp or fsdp2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impl", required=True, choices=["deepshard", "ddp", "deepspeed", "fsdp2"])
    parser.add_argument("--dtype", required=True, choices=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument(
        "--out", default=None, help="JSON file that rank 0 writes (required unless --print-config)"
    )
    parser.add_argument(
        "--extra-config",
        default="{}",
        help="JSON merged into the ds_config of deepshard and DeepSpeed (not DDP or FSDP2)",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the ds_config --impl would get (and whether deepshard accepts it) and exit",
    )
    parser.add_argument(
        "--world", type=int, default=2, help="with --print-config: the data-parallel world size"
    )
    args = parser.parse_args()
    extra = json.loads(args.extra_config)
    if args.print_config:
        config = engine_config(args.impl, args.dtype, args.micro_batch, args.world, extra)
        report = {"impl": args.impl, "dtype": args.dtype, "ds_config": config}
        report.update(check_config(args.impl, config, args.world))
        print(json.dumps(report))
        return
    if args.out is None:
        parser.error("--out is required (unless --print-config)")

    if args.impl == "deepspeed":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    cfg = PRESETS[args.preset]
    torch.manual_seed(0)
    model = GPT(cfg)
    contender = build(args.impl, args.dtype, model, args.micro_batch, world, extra)
    batches = [
        rank_slice(b, rank, world)
        for b in make_token_batches(
            cfg.vocab_size, cfg.seq_len, args.micro_batch * world, args.warmup + args.steps
        )
    ]

    phases: dict[str, list[float]] = {"forward": [], "backward": [], "step": []}
    step_s: list[float] = []
    losses = []
    start = 0.0
    for i, (x, y) in enumerate(batches):
        if i == args.warmup:
            dist.barrier()
            start = time.perf_counter()
        t0 = time.perf_counter()
        loss = contender.forward(x, y)
        t1 = time.perf_counter()
        contender.backward(loss)
        t2 = time.perf_counter()
        contender.step()
        t3 = time.perf_counter()
        if i >= args.warmup:
            phases["forward"].append(t1 - t0)
            phases["backward"].append(t2 - t1)
            phases["step"].append(t3 - t2)
            step_s.append(t3 - t0)
        losses.append(float(loss.detach()))
    dist.barrier()
    elapsed = time.perf_counter() - start

    mine = {
        "rank": rank,
        "pid": os.getpid(),
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "phase_median_ms": {k: 1000 * statistics.median(v) for k, v in phases.items()},
        "step_ms": [1000 * t for t in step_s],
    }
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        tokens = args.steps * args.micro_batch * world * cfg.seq_len
        result = {
            "impl": args.impl,
            "dtype": args.dtype,
            "world": world,
            "steps": args.steps,
            "warmup": args.warmup,
            "elapsed_s": elapsed,
            "tokens_per_s": tokens / elapsed,
            "contender": contender.describe(),
            "ds_config": engine_config(args.impl, args.dtype, args.micro_batch, world, extra),
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "ranks": gathered,
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
