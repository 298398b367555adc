"""``deepshard estimate``: predicted peak memory per rank, activations included, for stages 0-3.

    deepshard estimate --preset small --world_size 2 --micro_batch 8
    deepshard estimate --model mypkg.models:build --model_kwargs '{"layers": 24}' --deepspeed_config ds.json
    deepshard estimate --hf_config ./my-model-dir --seq_len 2048 --micro_batch 1 --stage 3 --world_size 8

The model comes from a preset of :mod:`deepshard.testing.models` (the example GPT), a Python factory
``module:function`` (called with ``--model_kwargs``), or a Hugging Face config (a local directory or
``config.json``; needs ``transformers``). It is built on fake tensors, so nothing of its size is
allocated. ``--deepspeed_config`` supplies the stage, micro-batch, dtype and reduce bucket; flags
override it. See :mod:`deepshard.profiling.peak_memory` for what is counted.
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from deepshard.profiling.peak_memory import (
    PeakEstimate,
    estimate_peak,
    format_table,
    measure_baseline,
    to_json,
)

MiB = 2**20


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deepshard estimate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--preset", help="a GPT preset of deepshard.testing.models (tiny, small-bytes, small, ...)"
    )
    source.add_argument("--model", help="module:function returning an nn.Module")
    source.add_argument("--hf_config", help="a Hugging Face config.json or model directory (local)")
    p.add_argument("--model_kwargs", default="{}", help="JSON keyword arguments for --model")
    p.add_argument(
        "--deepspeed_config", help="ds_config.json to take stage, micro-batch, dtype, buckets from"
    )
    p.add_argument("--stage", default=None, help="0, 1, 2, 3 or 'all' (default: the config's, else all)")
    p.add_argument("--world_size", type=int, default=1, help="data-parallel ranks")
    p.add_argument("--micro_batch", type=int, default=None, help="samples per rank per forward")
    p.add_argument("--seq_len", type=int, default=None, help="tokens per sample (default: the model's)")
    p.add_argument("--vocab_size", type=int, default=None, help="token id range (default: the model's)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="training dtype")
    p.add_argument("--activation_checkpointing", action="store_true", help="checkpoint each layer")
    p.add_argument("--baseline_mib", type=float, default=None, help="process baseline (default: measured)")
    p.add_argument("--json", action="store_true", help="print the components as JSON")
    return p


def _factory(args: argparse.Namespace) -> tuple[Callable[[], nn.Module], int | None, int | None]:
    """The model factory, and its sequence length and vocabulary size where known."""
    if args.preset:
        from deepshard.testing.models import GPT, PRESETS

        if args.preset not in PRESETS:
            raise ValueError(f"--preset {args.preset!r} is not one of {sorted(PRESETS)}")
        cfg = PRESETS[args.preset]
        return partial(GPT, cfg), cfg.seq_len, cfg.vocab_size
    if args.model:
        module_name, _, function = args.model.partition(":")
        if not function:
            raise ValueError(f"--model must be module:function, got {args.model!r}")
        build = getattr(importlib.import_module(module_name), function)
        return partial(build, **json.loads(args.model_kwargs)), None, None
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError as error:
        raise ValueError(
            "--hf_config needs the 'transformers' package (pip install 'deepshard[hf]')"
        ) from error
    config = AutoConfig.from_pretrained(args.hf_config)
    seq = getattr(config, "max_position_embeddings", None)
    return partial(AutoModelForCausalLM.from_config, config), seq, getattr(config, "vocab_size", None)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {
        "stages": [0, 1, 2, 3], "micro_batch": 1, "dtype": torch.float32, "bucket": 500_000_000, "persist": 100_000,
    }  # fmt: skip
    if args.deepspeed_config:
        from deepshard.config import load_config

        cfg = load_config(args.deepspeed_config, dp_world_size=args.world_size)
        zero = cfg.zero_optimization
        if "nvme" in (zero.offload_optimizer.device if zero.offload_optimizer else "", zero.offload_param.device
                      if zero.offload_param else ""):  # fmt: skip
            raise ValueError(
                "deepshard estimate does not model NVMe offload; remove offload to nvme from the config"
            )
        dtype = torch.bfloat16 if cfg.bf16.enabled else torch.float16 if cfg.fp16.enabled else torch.float32
        out.update(stages=[zero.stage], micro_batch=cfg.train_micro_batch_size_per_gpu, dtype=dtype,
                   bucket=int(zero.reduce_bucket_size), persist=int(zero.stage3_param_persistence_threshold))  # fmt: skip
    if args.stage is not None:
        if args.stage == "all":
            out["stages"] = [0, 1, 2, 3]
        elif args.stage in ("0", "1", "2", "3"):
            out["stages"] = [int(args.stage)]
        else:
            raise ValueError(f"--stage must be 0, 1, 2, 3 or all, got {args.stage!r}")
    if args.micro_batch is not None:
        out["micro_batch"] = args.micro_batch
    if args.dtype is not None:
        out["dtype"] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    return out


def run(args: argparse.Namespace) -> list[PeakEstimate]:
    """The estimates for the parsed command line."""
    factory, seq, vocab = _factory(args)
    seq = args.seq_len or seq
    vocab = args.vocab_size or vocab
    if seq is None or vocab is None:
        raise ValueError("give --seq_len and --vocab_size: they cannot be read from this model")
    settings = _settings(args)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        sizes = [p.numel() for p in factory().parameters()]
    num_params = sum(sizes)
    sharded = sum(n for n in sizes if n > settings["persist"])
    baseline = int(args.baseline_mib * MiB) if args.baseline_mib is not None else measure_baseline()
    return [
        estimate_peak(
            factory,
            num_params,
            stage=stage,
            world_size=args.world_size,
            micro_batch=settings["micro_batch"],
            seq_len=seq,
            vocab_size=vocab,
            dtype=settings["dtype"],
            reduce_bucket_size=settings["bucket"],
            activation_checkpointing=args.activation_checkpointing,
            baseline=baseline,
            sharded_params=sharded,
        )  # fmt: skip
        for stage in settings["stages"]
    ]


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``deepshard estimate``; prints the table (or JSON) to stdout."""
    args = _parser().parse_args(argv)
    try:
        estimates = run(args)
    except ValueError as error:
        raise SystemExit(f"deepshard estimate: {error}") from error
    # a command's output is its product: stdout, not the log
    sys_out = to_json(estimates) if args.json else format_table(estimates)
    print(sys_out)  # noqa: T201
    return 0
