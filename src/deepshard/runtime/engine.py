"""The training engine: orchestration of forward, backward, step, accumulation, clipping and counters.

The engine owns no mechanism of its own. It composes, in this order:

1. the :class:`~deepshard.precision.PrecisionPolicy` (module dtype, gradient dtype, wire dtype),
2. the ZeRO stage as data (:mod:`deepshard.zero.partition`): the gradient reducer (bucketed
   all-reduce or reduce-scatter), the master weights (whole or this rank's shards) and, when the
   optimizer state is sharded, the all-gather that makes updated parameters whole again,
3. the :class:`~deepshard.precision.LossScaler` (one for every stage),
4. the optimizer and learning-rate schedule built from the config or given by the user.

``step()`` at an accumulation boundary: gradients are already reduced (``backward`` waited for its
collectives) → global norm of the scaled gradients → overflow check → one multiply that both unscales
and clips → optimizer step on the masters → cast back into the module → loss-scale update → schedule
step → zero gradients.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset, Sampler

from deepshard import comm
from deepshard.accelerator import get_accelerator
from deepshard.autotuning.experiment import ExperimentRecorder
from deepshard.comm import comms_log as comms_logger
from deepshard.comm.bucketing import broadcast_coalesced
from deepshard.config import DeepShardConfig
from deepshard.monitor import TrainingMonitor
from deepshard.precision import LossScaler, PrecisionPolicy, loss_scaler_from_config
from deepshard.profiling.flops_profiler import FlopsProfiler
from deepshard.runtime.dataloader import DeepShardDataLoader
from deepshard.runtime.lr_schedules import build_lr_scheduler, write_current_lr
from deepshard.runtime.optimizers import build_optimizer
from deepshard.utils.logging import log_dist
from deepshard.zero import fragments
from deepshard.zero.grad_reduce import ReduceSpec
from deepshard.zero.partition import build_partition
from deepshard.zero.rows import LOCAL_ROWS
from deepshard.zero.shard_group import cast_module
from deepshard.zero.stage import ZeroStage

OptimizerLike = torch.optim.Optimizer | Callable[..., torch.optim.Optimizer]


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes of model state held by this rank on the device side (the accelerator, or RAM on a CPU-only
    machine), and in ``tiers`` what offload put in host memory (``cpu``, staging ``buffers`` included)
    and on disk (``nvme``), each with ``parameters``, ``master_weights``, ``optimizer_states``, ``buffers``."""

    parameters: int
    gradients: int
    master_weights: int
    optimizer_states: int
    tiers: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """All model-state bytes on this rank."""
        return self.parameters + self.gradients + self.master_weights + self.optimizer_states


class DeepShardEngine(torch.nn.Module):
    """Wraps a model for data-parallel training; built by :func:`deepshard.initialize`."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: DeepShardConfig,
        optimizer: OptimizerLike | None = None,
        model_parameters: Iterable[Any] | None = None,
        lr_scheduler: Any = None,
        training_data: Dataset[Any] | None = None,
        collate_fn: Callable[..., Any] | None = None,
        mpu: Any = None,
    ) -> None:
        super().__init__()
        self._config = config
        self.accelerator = get_accelerator()
        self.mpu = mpu
        self.dp_group = mpu.get_data_parallel_group() if mpu is not None else None
        self.dp_world_size = comm.get_world_size(self.dp_group)
        self.global_rank = comm.get_rank()
        self.local_rank = comm.get_local_rank()
        self.device = self.accelerator.device(self.local_rank if self.accelerator.name == "cuda" else None)

        # 1. precision policy and the module in its dtype, identical on every rank
        self.precision = PrecisionPolicy.from_config(config)
        if config.zero_optimization.stage < 3 and any(p in LOCAL_ROWS for p in model.parameters()):
            raise ValueError(
                "the model was built under deepshard.zero.Init (its large parameters hold only this rank's rows), "
                f"but zero_optimization.stage is {config.zero_optimization.stage}; set zero_optimization.stage "
                "to 3, or build the model without zero.Init."
            )
        cast_module(model, self.device, self.precision.param_dtype)
        self.module = model
        self._broadcast_model()
        params = list(model.parameters())

        # 2–3. the ZeRO stage: gradient buffers and their reduction, master weights, parameter gathering
        spec = ReduceSpec(
            world_size=self.dp_world_size,
            reduce_dtype=self.precision.reduce_dtype,
            prescale=config.prescale_gradients,
            predivide_factor=config.gradient_predivide_factor,
        )
        self.zero_stage = ZeroStage.from_int(config.zero_optimization.stage)
        self.partition = build_partition(
            self.zero_stage, params, self.precision, config.zero_optimization, spec,
            rank=comm.get_rank(self.dp_group), group=self.dp_group, module=model, aio=config.aio,
        )
        self.reducer = self.partition.reducer
        self.masters = self.partition.masters

        # 3–4. loss scaler, optimizer and schedule
        self.loss_scaler: LossScaler = loss_scaler_from_config(config)
        self.optimizer = self._configure_optimizer(optimizer, model_parameters, params)
        self.lr_scheduler = self._configure_lr_scheduler(lr_scheduler)
        self.partition.bind_optimizer(self.optimizer)
        fragments.register(list(self.masters.params), self.partition)

        self.training_dataloader = (
            self.deepspeed_io(training_data, collate_fn=collate_fn) if training_data is not None else None
        )

        # counters (DeepSpeed's names)
        self.micro_steps = 0
        self.global_steps = 0
        self.global_samples = 0
        self.skipped_steps = 0
        self._boundary_override: bool | None = None
        self._inside_no_sync = False
        self._step_applied = False
        self._global_grad_norm: float | None = None
        # observability (deepshard.monitor, deepshard.profiling): monitors, phase timers, flops profiler
        self.monitor = TrainingMonitor(config, self.device, self.dp_group)
        self._timers = self.monitor.timers
        fp = config.flops_profiler
        self.flops_profiler = FlopsProfiler(model, self, fp.recompute_fwd_factor) if fp.enabled else None
        self._autotuning = ExperimentRecorder.from_env(config)  # set only inside an autotuning experiment
        if config.comms_logger.enabled:
            comms_logger.configure(config)  # the process's logger observes deepshard.comm (DeepSpeed's rule)
        log_dist(
            f"engine ready: world={self.dp_world_size} params={sum(p.numel() for p in params):,} "
            f"dtype={self.precision.param_dtype} micro_batch={self.train_micro_batch_size_per_gpu()} "
            f"gas={self.gradient_accumulation_steps()} train_batch={self.train_batch_size()}",
            ranks=[0],
        )

    # ------------------------------------------------------------------ construction helpers
    def _broadcast_model(self) -> None:
        if self.dp_world_size > 1:
            # parameters built sharded by zero.Init were made identical on every rank when built
            tensors = [t.data for t in self.module.parameters() if t not in LOCAL_ROWS]
            tensors += list(self.module.buffers())
            src = torch.distributed.get_global_rank(self.dp_group, 0) if self.dp_group is not None else 0
            broadcast_coalesced(tensors, src=src, group=self.dp_group)

    def _masters_of(self, model_parameters: Iterable[Any]) -> list[Any]:
        """``model_parameters`` (tensors or param-group dicts) with each parameter replaced by its master."""
        out: list[Any] = []
        for item in model_parameters:
            if isinstance(item, dict):
                group = dict(item)
                group["params"] = [self.masters.master_of(p) for p in item["params"] if p.requires_grad]
                out.append(group)
            elif item.requires_grad:
                out.append(self.masters.master_of(item))
        return out

    def _configure_optimizer(
        self, client: OptimizerLike | None, model_parameters: Iterable[Any] | None, params: list[torch.nn.Parameter]
    ) -> torch.optim.Optimizer | None:
        cfg_opt = self._config.optimizer
        if client is not None and cfg_opt is not None:
            _warn_ignored_section("optimizer", cfg_opt.type)
            cfg_opt = None
        model_parameters = list(model_parameters) if model_parameters is not None else params
        if isinstance(client, torch.optim.Optimizer):
            self.masters.adopt(client)
            return client
        if client is not None:
            if not callable(client):
                raise ValueError(f"optimizer must be a torch.optim.Optimizer or a callable, got {type(client).__name__}")
            built = client(self._masters_of(model_parameters))
            if not isinstance(built, torch.optim.Optimizer):
                raise ValueError(f"the optimizer callable returned {type(built).__name__}, not a torch.optim.Optimizer")
            return built
        if cfg_opt is not None:
            return build_optimizer(cfg_opt.type, cfg_opt.params, self._masters_of(model_parameters))
        return None

    def _configure_lr_scheduler(self, client: Any) -> Any:
        cfg_sched = self._config.scheduler
        if client is not None and cfg_sched is not None:
            _warn_ignored_section("lr_scheduler", cfg_sched.type)
            cfg_sched = None
        if client is not None:
            # A class or factory is called with the optimizer (DeepSpeed's rule); an instance is used as is.
            if not callable(client):
                return client
            if self.optimizer is None:
                raise ValueError("lr_scheduler is a callable but there is no optimizer to give it")
            return client(self.optimizer)
        if cfg_sched is not None:
            if self.optimizer is None:
                raise ValueError(
                    "the config has a 'scheduler' section but no optimizer; add an 'optimizer' section or pass one."
                )
            return build_lr_scheduler(cfg_sched.type, cfg_sched.params, self.optimizer)
        return None

    def deepspeed_io(
        self,
        dataset: Dataset[Any],
        batch_size: int | None = None,
        route: str | None = None,
        pin_memory: bool = False,
        data_sampler: Sampler[Any] | None = None,
        collate_fn: Callable[..., Any] | None = None,
        num_local_io_workers: int | None = None,
    ) -> DeepShardDataLoader:
        """A loader over this rank's share of ``dataset`` with the micro-batch size (DeepSpeed's name)."""
        del route
        return DeepShardDataLoader(
            dataset,
            batch_size=batch_size or self.train_micro_batch_size_per_gpu(),
            rank=comm.get_rank(self.dp_group),
            world_size=self.dp_world_size,
            collate_fn=collate_fn,
            drop_last=self._config.dataloader_drop_last,
            num_workers=num_local_io_workers or 0,
            pin_memory=pin_memory,
            data_sampler=data_sampler,
        )

    # ------------------------------------------------------------------ config views
    @property
    def config(self) -> DeepShardConfig:
        """The resolved configuration."""
        return self._config

    def train_batch_size(self) -> int:
        """Samples per optimizer step across all data-parallel ranks."""
        return self._config.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        """Samples per forward on one rank."""
        return self._config.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        """Micro-batches per optimizer step."""
        return self._config.gradient_accumulation_steps

    def gradient_clipping(self) -> float:
        """The global-norm clipping threshold (0 = off)."""
        return self._config.gradient_clipping

    def zero_optimization_stage(self) -> int:
        """The ZeRO stage in use."""
        return self._config.zero_optimization.stage

    def zero_gather_16bit_weights_on_model_save(self) -> bool:
        """Whether ``save_16bit_model`` gathers ZeRO-3 weights (``stage3_gather_16bit_weights_on_model_save``)."""
        return self._config.zero_optimization.stage3_gather_16bit_weights_on_model_save

    def fp16_enabled(self) -> bool:
        """Whether the module runs in fp16."""
        return self._config.fp16.enabled

    def bfloat16_enabled(self) -> bool:
        """Whether the module runs in bf16."""
        return self._config.bf16.enabled

    # ------------------------------------------------------------------ accumulation boundary
    def is_gradient_accumulation_boundary(self) -> bool:
        """Whether the current micro-step ends an accumulation window (or the override set by the user)."""
        if self._boundary_override is not None:
            return self._boundary_override
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool) -> None:
        """Override the boundary state, ignoring the micro-step count, until it is set again (DeepSpeed's rule).

        Set it before each forward/backward, ``True`` on the last one of an accumulation window.
        """
        self._boundary_override = bool(is_boundary)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Accumulate gradients locally without reducing them; the next backward outside reduces all.

        As in DeepSpeed, ``step()`` may not be called inside, and micro-steps are not counted.
        """
        if self._inside_no_sync:
            raise ValueError("no_sync() is already active; it cannot be nested")
        self._inside_no_sync = True
        try:
            yield
        finally:
            self._inside_no_sync = False

    # ------------------------------------------------------------------ forward / backward / step
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped module."""
        if self._config.fp16.enabled and self._config.fp16.auto_cast:
            args, kwargs = _cast_floating((args, kwargs), torch.float16)
        self.monitor.on_forward(args, kwargs)
        profiling = self._flops_profiler_active() and self.module.training
        if profiling:
            self.flops_profiler.start_profile()  # type: ignore[union-attr]
        start = time.perf_counter()
        out = self.module(*args, **kwargs)
        self._timers.add("forward", time.perf_counter() - start)
        if profiling:
            self.flops_profiler.stop_profile()  # type: ignore[union-attr]
        return out

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        """Backward of ``loss / gradient_accumulation_steps`` times the loss scale.

        At an accumulation boundary (outside ``no_sync``) gradients are reduced across ranks while
        backward runs, and are final when this returns. Returns the accumulation-scaled loss.
        """
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(
                f"backward() needs a scalar loss tensor, got {type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else "")
                + "; reduce it (e.g. loss.mean()) first."
            )
        self.monitor.on_backward(loss)
        start = time.perf_counter()
        if scale_wrt_gas and self.gradient_accumulation_steps() > 1:
            loss = loss / self.gradient_accumulation_steps()
        boundary = self.is_gradient_accumulation_boundary() or self.reducer.reduces_every_micro_step
        reduce = boundary and not self._inside_no_sync
        self.reducer.begin_backward(reduce)
        scaled = loss * self.loss_scaler.scale if self.loss_scaler.enabled else loss
        scaled.backward(retain_graph=retain_graph)
        inner_end = time.perf_counter()
        self.partition.after_backward()
        self.reducer.finish()
        end = time.perf_counter()
        self._timers.add("backward_inner", inner_end - start)
        self._timers.add("backward_allreduce", end - inner_end)
        self._timers.add("backward", end - start)
        return loss

    def step(self, lr_kwargs: dict[str, Any] | None = None) -> None:
        """Count a micro-step; at a boundary, apply the optimizer step (or skip it on overflow)."""
        if self._inside_no_sync:
            raise ValueError("step() was called inside no_sync(); leave the no_sync() block before stepping")
        start = time.perf_counter()
        self._step_applied = False
        boundary = self.is_gradient_accumulation_boundary()
        profiling = boundary and self._flops_profiler_active()
        if boundary:
            if self.optimizer is None:
                raise ValueError("step() needs an optimizer: pass optimizer= to initialize() or add an 'optimizer' section")
            self._take_model_step(lr_kwargs)
        self.micro_steps += 1
        self._timers.add("step", time.perf_counter() - start)
        if profiling:
            fp = self._config.flops_profiler
            self.flops_profiler.print_model_profile(  # type: ignore[union-attr]
                fp.profile_step, fp.module_depth, fp.top_modules, fp.detailed, fp.output_file
            )
            self.flops_profiler.end_profile()  # type: ignore[union-attr]
        if boundary:
            self.monitor.on_step(self)
            if self._autotuning is not None:
                self._autotuning.on_step(self)

    def _flops_profiler_active(self) -> bool:
        """DeepSpeed's rule: the flops profiler profiles step ``profile_step`` on global rank 0."""
        return (
            self.flops_profiler is not None
            and self.global_steps == self._config.flops_profiler.profile_step
            and self.global_rank == 0
        )

    def _take_model_step(self, lr_kwargs: dict[str, Any] | None) -> None:
        assert self.optimizer is not None
        scale = self.loss_scaler.scale
        scaled_norm = self.partition.global_norm()
        self._global_grad_norm = scaled_norm / scale
        overflow = self.precision.check_overflow and not math.isfinite(scaled_norm)
        if overflow:
            self.skipped_steps += 1
            log_dist(f"gradient overflow at step {self.global_steps}: skipping it (loss scale {scale})", ranks=[0])
        else:
            combined = scale
            clip = self.gradient_clipping()
            if clip > 0:
                ratio = (scaled_norm / scale + 1e-6) / clip
                if ratio > 1:
                    combined = ratio * scale
            self.partition.unscale_and_clip(1.0 / combined)
            self.partition.begin_update()
            self.partition.step_optimizer(self.optimizer)
            self.partition.publish()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step(**(lr_kwargs or {}))
        self.loss_scaler.update(overflow)
        self._step_applied = not overflow
        self.zero_grad()
        self.global_steps += 1
        self.global_samples += self.train_batch_size()
        every = self._config.steps_per_print
        if every is not None and self.global_steps % every == 0:
            self._report_progress()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear accumulated gradients (buffers are zeroed in place; ``set_to_none`` is accepted for API parity)."""
        del set_to_none
        self.reducer.zero()

    def _report_progress(self) -> None:
        lrs = ", ".join(f"{lr:.3e}" for lr in self.get_lr())
        message = f"step={self.global_steps} skipped={self.skipped_steps} lr=[{lrs}] loss_scale={self.loss_scaler.scale}"
        if self._config.wall_clock_breakdown:
            message += " | " + " ".join(f"{k}={v * 1000:.1f}ms" for k, v in self._timers.take_total().items())
        if self._config.memory_breakdown:
            mem = self.memory_breakdown()
            message += f" | model state {mem.total / 2**20:.1f} MiB"
        log_dist(message, ranks=[0], level=logging.INFO)

    # ------------------------------------------------------------------ queries
    def was_step_applied(self) -> bool:
        """Whether the last ``step()`` call updated the parameters (false off-boundary or on overflow)."""
        return self._step_applied

    def get_global_grad_norm(self) -> float | None:
        """Global norm of the unscaled, reduced gradients at the last boundary, before clipping."""
        return self._global_grad_norm

    def get_lr(self) -> list[float]:
        """Current learning rate of each parameter group."""
        if self.optimizer is None:
            return []
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def get_loss_scale(self) -> float:
        """The current loss scale (1.0 without fp16)."""
        return self.loss_scaler.scale

    def memory_breakdown(self) -> MemoryBreakdown:
        """Bytes this rank holds for parameters, gradients, master weights and optimizer state, per tier."""
        state_bytes = 0
        if self.optimizer is not None and self.partition.offload is None:
            for state in self.optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        state_bytes += value.numel() * value.element_size()
        return MemoryBreakdown(
            parameters=self.partition.parameter_bytes(self.module),
            gradients=self.reducer.nbytes,
            master_weights=self.masters.nbytes if self.partition.offload is None else 0,
            optimizer_states=state_bytes,
            tiers=self.partition.tier_bytes(),
        )

    def offload_stats(self) -> dict[str, int]:
        """Bytes this rank has read from and written to the NVMe tier so far (parameters and optimizer)."""
        spaces = [self.partition.param_swap, self.partition.offload.swap if self.partition.offload else None]
        engines = {id(s.engine): s.engine for s in spaces if s is not None}  # the tiers may share one
        return {
            "bytes_read": sum(e.bytes_read for e in engines.values()),
            "bytes_written": sum(e.bytes_written for e in engines.values()),
        }

    def destroy(self) -> None:
        """Remove the engine's hooks from the module (gradient reduction, stage-3 gathers) and its swap files."""
        self.partition.remove_hooks()
        self.partition.close()
        self.monitor.close()
        if self._config.comms_logger.enabled:
            comms_logger.comms_logger.set_enabled(False)

    # ------------------------------------------------------------------ checkpoints (logic in deepshard.checkpoint)
    def _checkpoint_io(self) -> Any:
        from deepshard.checkpoint import Checkpointer

        io = getattr(self, "_checkpointer", None)
        if io is None:
            io = Checkpointer(self)
            self._checkpointer = io
        return io

    def save_checkpoint(
        self,
        save_dir: str,
        tag: str | None = None,
        client_state: dict[str, Any] | None = None,
        save_latest: bool = True,
        exclude_frozen_parameters: bool = False,
        async_save: bool | None = None,
    ) -> str:
        """Collective: save to ``save_dir/<tag>`` (default ``global_step<N>``) and return that path.

        See :class:`deepshard.checkpoint.Checkpointer`; ``async_save`` writes in the background.
        """
        return self._checkpoint_io().save(
            save_dir, tag, client_state, save_latest, exclude_frozen_parameters, async_save
        )

    def load_checkpoint(
        self,
        load_dir: str,
        tag: str | None = None,
        load_module_strict: bool = True,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
        load_module_only: bool = False,
    ) -> tuple[str | None, dict[str, Any] | None]:
        """Collective: restore from ``load_dir`` (its ``latest`` unless ``tag``); ``(path, client_state)``.

        With ``load_optimizer_states=False`` the restored schedule's lr is written into the optimizer,
        so the next step uses it (DeepSpeed leaves the fresh optimizer's lr, e.g. 0 in a warmup).
        """
        path, client_state = self._checkpoint_io().load(
            load_dir, tag, load_module_strict, load_optimizer_states, load_lr_scheduler_states, load_module_only
        )
        restored_schedule = path is not None and load_lr_scheduler_states and not load_module_only
        if (
            restored_schedule
            and not load_optimizer_states
            and self.lr_scheduler is not None
            and self.optimizer is not None
            and not write_current_lr(self.lr_scheduler, self.optimizer)
        ):
            log_dist(
                f"the restored {type(self.lr_scheduler).__name__} cannot tell its current lr; the optimizer "
                "keeps its lr until the schedule's next step",
                ranks=[0], level=logging.WARNING,
            )  # fmt: skip
        return path, client_state

    def wait_for_checkpoint(self) -> None:
        """Block until an asynchronous ``save_checkpoint`` is on disk; raise its error if it failed."""
        self._checkpoint_io().wait()

    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters: bool = False) -> dict[str, Any]:
        """Collective: the module's whole state dict in its training dtype on global rank 0, ``{}`` elsewhere.

        DeepSpeed's name; accelerate's ``get_state_dict`` (HF ``save_model`` at ZeRO-3) calls it. Parameters
        are gathered one ZeRO-3 group at a time into host copies.
        """
        from deepshard.zero import full_state_dict

        whole = full_state_dict(self.module, cpu=True)
        if exclude_frozen_parameters:
            frozen = {n for n, p in self.module.named_parameters(remove_duplicate=False) if not p.requires_grad}
            whole = {k: v for k, v in whole.items() if k not in frozen}
        return whole if self.global_rank == 0 else {}

    def save_16bit_model(
        self, save_dir: str, save_filename: str = "pytorch_model.bin", exclude_frozen_parameters: bool = False
    ) -> bool:
        """Collective: rank 0 writes the module's weights (``.safetensors`` or a ``torch.save`` file)."""
        from deepshard.checkpoint import save_16bit_model

        return save_16bit_model(self, save_dir, save_filename, exclude_frozen_parameters)


DeepSpeedEngine = DeepShardEngine
"""DeepSpeed's name (``deepspeed.runtime.engine.DeepSpeedEngine``), for ``isinstance`` checks."""


def _warn_ignored_section(argument: str, config_type: str) -> None:
    """DeepSpeed's rule: what the script passes to ``initialize`` wins over the config's section."""
    section = "optimizer" if argument == "optimizer" else "scheduler"
    log_dist(
        f"initialize({argument}=...) was given, so the config's '{section}' section ({config_type!r}) is ignored "
        f"(DeepSpeed's rule: the client's {argument} wins); remove the section to silence this warning.",
        ranks=[0], level=logging.WARNING,
    )  # fmt: skip


def _cast_floating(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, tuple):
        return tuple(_cast_floating(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast_floating(o, dtype) for o in obj]
    if isinstance(obj, dict):
        return {k: _cast_floating(v, dtype) for k, v in obj.items()}
    return obj
