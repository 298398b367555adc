"""Peak memory per rank of a training run, activations included: what ``deepshard estimate`` prints.

The peak of one rank is predicted as the sum of

* ``baseline``: the process before the model (Python, torch, deepshard, the process group), measured
  by :func:`measure_baseline` in a fresh interpreter, or given;
* model states as deepshard lays them out for the stage (what ``engine.memory_breakdown()`` reports):
  parameters ``p·Ψ`` (``p`` = 4 fp32, 2 bf16/fp16; at stage 3 tensors above
  ``stage3_param_persistence_threshold`` are sharded, ``p·Ψ_sharded/N``), gradients ``p·Ψ`` (stages 0-1) or ``p·Ψ/N``
  (2-3), fp32 master weights (none for fp32 training: the optimizer steps the parameters; else
  ``4Ψ`` at stage 0, ``4Ψ/N`` above), Adam's two fp32 moments ``8Ψ`` (stage 0) or ``8Ψ/N``;
* the model as the script built it (``4Ψ``: fp32, before ``initialize``): the engine copies the
  parameters into its own flat buffers and frees the originals, but the host allocator keeps those
  pages resident (glibc raises its mmap threshold to the size of freed blocks, so later large
  tensors are mapped fresh instead of reusing them); measured by RSS, it stays part of the peak;
* gradient-reduction buffers of stages 2-3: one bucket of ``min(reduce_bucket_size, Ψ)`` elements in
  the gradient dtype and the scratch buffer of the same size the host reduce-scatter uses;
* activations and temporaries at the peak of one micro-batch's forward and backward, traced with
  ``torch.distributed._tools.mem_tracker.MemTracker`` on fake tensors: the real model code runs, but
  no memory is allocated and nothing is computed. With ``activation_checkpointing`` each layer of the
  model's first ``nn.ModuleList`` is wrapped in ``torch.utils.checkpoint`` for the trace.

Offloaded optimizer state (``offload_optimizer: cpu``) is still host RAM on a CPU-only machine and is
counted the same; NVMe offload (which moves it out of RAM) is not modelled and is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

MiB = 2**20

_BASELINE_SCRIPT = """
import datetime, os, resource, tempfile
import torch, torch.distributed as dist
import deepshard
store = tempfile.mktemp()
dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1,
                        timeout=datetime.timedelta(seconds=60))
t = torch.ones(1024)
dist.all_reduce(t)
torch.nn.functional.linear(torch.ones(8, 8), torch.ones(8, 8)).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
dist.destroy_process_group()
"""


def measure_baseline() -> int:
    """Peak RSS in bytes of a fresh interpreter that imported torch and deepshard and ran one gloo collective."""
    out = subprocess.run(
        [sys.executable, "-c", _BASELINE_SCRIPT], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"measuring the baseline failed:\n{out.stderr[-2000:]}")
    return int(out.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class PeakEstimate:
    """Bytes per rank at the predicted peak, by component; :attr:`total` is the prediction."""

    stage: int
    world_size: int
    baseline: int
    initial_model: int
    parameters: int
    gradients: int
    master_weights: int
    optimizer_states: int
    reduce_buffers: int
    activations: int
    temporaries: int

    @property
    def model_states(self) -> int:
        """Parameters, gradients, master weights and optimizer state."""
        return self.parameters + self.gradients + self.master_weights + self.optimizer_states

    @property
    def total(self) -> int:
        """The predicted peak per rank."""
        return (
            self.baseline + self.initial_model + self.model_states + self.reduce_buffers + self.activations
            + self.temporaries
        )  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        """The components and the total, in bytes."""
        return {**asdict(self), "model_states": self.model_states, "total": self.total}


def model_state_bytes(
    num_params: int, stage: int, world_size: int, param_bytes: int, sharded_params: int | None = None
) -> dict[str, int]:
    """deepshard's model-state bytes per rank for Adam/AdamW (see the module doc).

    ``sharded_params``: at stage 3, the parameters of tensors above ``stage3_param_persistence_threshold``
    (the others stay whole on every rank); default: none (all persistent), as for a small model.
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage}")
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    n, shard = num_params, -(-num_params // world_size)  # ceil: shards are padded to equal size
    grads = param_bytes * (n if stage < 2 else shard)
    if param_bytes == 4:
        master = 0
    else:
        master = 4 * (n if stage == 0 else shard)
    optim = 8 * (n if stage == 0 else shard)
    params = n
    if stage == 3 and sharded_params:
        params = n - sharded_params + -(-sharded_params // world_size)
    return {
        "parameters": param_bytes * params,
        "gradients": grads,
        "master_weights": master,
        "optimizer_states": optim,
    }


def _checkpoint_layers(model: nn.Module) -> None:
    """Wrap each layer of the first ``nn.ModuleList`` of ``model`` in ``torch.utils.checkpoint`` (in place)."""
    from torch.utils.checkpoint import checkpoint

    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for layer in module:
                forward = layer.forward

                def wrapped(*args: Any, _forward: Callable[..., Any] = forward, **kwargs: Any) -> Any:
                    return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

                layer.forward = wrapped  # type: ignore[method-assign]
            return
    raise ValueError("activation_checkpointing: the model has no nn.ModuleList of layers to checkpoint")


def _loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    config = getattr(model, "config", None)
    if (
        config is not None and hasattr(config, "vocab_size") and hasattr(model, "generate")
    ):  # a transformers model
        return model(input_ids=tokens, labels=tokens).loss
    out = model(tokens, tokens)
    return out if out.dim() == 0 else out.float().sum()


def trace_activations(
    factory: Callable[[], nn.Module],
    micro_batch: int,
    seq_len: int,
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
    activation_checkpointing: bool = False,
) -> tuple[int, int]:
    """``(activation bytes, temporary bytes)`` at the peak of one forward+backward of a micro-batch.

    The model is built by ``factory`` under ``FakeTensorMode`` (no memory is allocated) with
    ``dtype`` as the default dtype, and trained on a ``(micro_batch, seq_len)`` batch of token ids; its loss is
    ``model(tokens, tokens)`` (deepshard's GPT) or ``model(input_ids=..., labels=...).loss`` (transformers).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType

    previous = torch.get_default_dtype()
    with FakeTensorMode():
        torch.set_default_dtype(dtype)  # built in the training dtype (fake tensors cannot be cast in place)
        try:
            model = factory()
        finally:
            torch.set_default_dtype(previous)
        if activation_checkpointing:
            _checkpoint_layers(model)
        tokens = torch.randint(0, vocab_size, (micro_batch, seq_len))
        tracker = MemTracker()
        tracker.track_external(model)
        with tracker:
            _loss(model, tokens).backward()
        peak = tracker.get_tracker_snapshot("peak")
    per_device = next(iter(peak.values()))
    return int(per_device[_MemRefType.ACT]), int(per_device[_MemRefType.TEMP])


def estimate_peak(
    factory: Callable[[], nn.Module],
    num_params: int,
    *,
    stage: int,
    world_size: int,
    micro_batch: int,
    seq_len: int,
    vocab_size: int,
    dtype: torch.dtype = torch.float32,
    reduce_bucket_size: int = 500_000_000,
    activation_checkpointing: bool = False,
    baseline: int | None = None,
    sharded_params: int | None = None,
) -> PeakEstimate:
    """The predicted peak per rank of training the model of ``factory`` (see the module doc)."""
    param_bytes = torch.empty((), dtype=dtype).element_size()
    states = model_state_bytes(num_params, stage, world_size, param_bytes, sharded_params)
    reduce = 2 * min(reduce_bucket_size, num_params) * param_bytes if stage >= 2 else 0
    act, temp = trace_activations(factory, micro_batch, seq_len, vocab_size, dtype, activation_checkpointing)
    return PeakEstimate(
        stage=stage,
        world_size=world_size,
        baseline=measure_baseline() if baseline is None else baseline,
        initial_model=4 * num_params,
        reduce_buffers=reduce,
        activations=act,
        temporaries=temp,
        **states,
    )


def format_table(estimates: list[PeakEstimate]) -> str:
    """One row per estimate, MiB."""
    cols = (
        "stage",
        "ranks",
        "baseline",
        "built",
        "params",
        "grads",
        "master",
        "optim",
        "reduce",
        "activ.",
        "temp",
        "peak/rank",
    )
    lines = [" ".join(f"{c:>9}" for c in cols) + "  (MiB)"]
    for e in estimates:
        values = (e.baseline, e.initial_model, e.parameters, e.gradients, e.master_weights, e.optimizer_states, e.reduce_buffers,
                  e.activations, e.temporaries, e.total)  # fmt: skip
        lines.append(f"{e.stage:>9} {e.world_size:>9} " + " ".join(f"{v / MiB:>9.1f}" for v in values))
    return "\n".join(lines)


def to_json(estimates: list[PeakEstimate]) -> str:
    """The estimates as a JSON list of component dicts (bytes)."""
    return json.dumps([e.as_dict() for e in estimates], indent=2)
