"""The flops profiler: flops, MACs, parameters and forward latency of every module of one forward.

:class:`FlopsProfiler` has DeepSpeed's interface (``start_profile``, ``stop_profile``, ``end_profile``,
``get_total_*``, ``print_model_profile``) and :func:`get_model_profile` profiles a model on given
inputs. Counting is :mod:`deepshard.profiling.flops_profiler.counting` (``torch.utils.flop_counter``:
a dispatch mode, so it sees every aten op including those inside functionals, and nothing is
monkey-patched); latency comes from forward pre/post hooks on each module. The profile state lives in
the profiler (a dict keyed by module), never on the modules. Profiling costs one Python hook pair per
module and a dispatch-mode hop per op while it is on, nothing when it is off.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torch.utils.hooks import RemovableHandle

from deepshard.accelerator import get_accelerator
from deepshard.profiling.flops_profiler.counting import flop_counter, split_counts, warm_up_counter
from deepshard.profiling.flops_profiler.report import render_profile
from deepshard.profiling.flops_profiler.units import macs_to_string, number_to_string, params_to_string
from deepshard.utils.logging import logger


@dataclass
class ModuleProfile:
    """One module's forward: flops and MACs (its submodules' included), trainable parameters, seconds."""

    flops: int = 0
    macs: int = 0
    params: int = 0
    duration: float = 0.0


class FlopsProfiler:
    """Profiles the forward passes of ``model`` between :meth:`start_profile` and :meth:`stop_profile`.

    ``ds_engine`` (optional) adds the engine's batch size, world size and phase latencies to the
    printed summary; ``recompute_fwd_factor`` is the share of the forward recomputed in backward
    (activation checkpointing), so backward costs ``(2 + factor)`` times the forward flops.
    """

    def __init__(self, model: nn.Module, ds_engine: Any = None, recompute_fwd_factor: float = 0.0) -> None:
        self.model = model
        self.ds_engine = ds_engine
        self.recompute_fwd_factor = recompute_fwd_factor
        self.started = False
        self._counter: FlopCounterMode | None = None
        self._counting = False
        self._counts: dict[str, dict[Any, int]] = {}
        self._durations: dict[nn.Module, float] = {}
        self._starts: dict[nn.Module, list[float]] = {}
        self._handles: list[RemovableHandle] = []
        self._ignored: tuple[type, ...] = ()

    # ------------------------------------------------------------------ lifecycle (DeepSpeed's names)
    def start_profile(self, ignore_list: Iterable[type] | None = None) -> None:
        """Start counting and timing; modules whose type is in ``ignore_list`` are not timed."""
        if self.started:
            self.reset_profile()
        else:
            self._durations, self._counts = {}, {}
        warm_up_counter()
        logger.info("flops profiler started")
        self._ignored = tuple(ignore_list or ())
        sync = _synchronizer()
        for module in self.model.modules():
            if isinstance(module, self._ignored):
                continue
            self._handles.append(module.register_forward_pre_hook(self._pre_hook(sync)))
            self._handles.append(module.register_forward_hook(self._post_hook(sync)))
        self._counter = flop_counter()
        self._counter.__enter__()
        self._counting = True
        self.started = True

    def stop_profile(self) -> None:
        """Stop counting and timing; the profile stays readable until :meth:`end_profile`."""
        if self._counting and self._counter is not None:
            self._counts = dict(self._counter.get_flop_counts())
            self._counter.__exit__(None, None, None)
            self._counting = False
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def reset_profile(self) -> None:
        """Zero the counts and timings (keeps profiling if it is on)."""
        self._durations, self._starts = {}, {}
        if self._counting and self._counter is not None:
            self._counter.flop_counts.clear()
        self._counts = {}

    def end_profile(self) -> None:
        """Stop and discard the profile."""
        self.stop_profile()
        self._counter = None
        self._counts, self._durations = {}, {}
        self.started = False
        logger.info("flops profiler finished")

    # ------------------------------------------------------------------ results
    def _live_counts(self) -> dict[str, dict[Any, int]]:
        if self._counting and self._counter is not None:
            return dict(self._counter.get_flop_counts())
        return self._counts

    def profiles(self) -> dict[str, ModuleProfile]:
        """Profile of every module by qualified name (``""`` is the model itself)."""
        counts = self._live_counts()
        root = type(self.model).__name__
        out: dict[str, ModuleProfile] = {}
        for name, module in self.model.named_modules():
            flops, macs = split_counts(counts.get(f"{root}.{name}" if name else root, {}))
            params = sum(p.numel() for p in module.parameters() if p.requires_grad)
            out[name] = ModuleProfile(flops, macs, params, self._duration(module))
        return out

    def _duration(self, module: nn.Module) -> float:
        seconds = self._durations.get(module, 0.0)
        if seconds == 0.0:  # a container that is never called itself (ModuleList): its children's sum
            seconds = sum(self._duration(child) for child in module.children())
        return seconds

    def get_total_flops(self, as_string: bool = False) -> int | str:
        """Forward flops of the model (2 per MAC, plus element-wise ops)."""
        flops = split_counts(self._live_counts().get(type(self.model).__name__, {}))[0]
        return number_to_string(flops) if as_string else flops

    def get_total_macs(self, as_string: bool = False) -> int | str:
        """Forward multiply-accumulates of the model."""
        macs = split_counts(self._live_counts().get(type(self.model).__name__, {}))[1]
        return macs_to_string(macs) if as_string else macs

    def get_total_duration(self, as_string: bool = False) -> float | str:
        """Seconds spent in the model's forward while profiling."""
        seconds = self._duration(self.model)
        return f"{number_to_string(seconds)}s" if as_string else seconds

    def get_total_params(self, as_string: bool = False) -> int | str:
        """Trainable parameters of the model."""
        params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return params_to_string(params) if as_string else params

    # ------------------------------------------------------------------ printing
    def model_profile_text(
        self, profile_step: int = 1, module_depth: int = -1, top_modules: int = 1, detailed: bool = True
    ) -> str:
        """The profile as DeepSpeed prints it: summary, top modules per depth, and the annotated model tree."""
        return render_profile(self, profile_step, module_depth, top_modules, detailed)

    def print_model_profile(
        self,
        profile_step: int = 1,
        module_depth: int = -1,
        top_modules: int = 1,
        detailed: bool = True,
        output_file: str | None = None,
    ) -> None:
        """Log the profile (or write it to ``output_file``); does nothing unless profiling was started."""
        if not self.started:
            return
        text = self.model_profile_text(profile_step, module_depth, top_modules, detailed)
        if output_file:
            os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
            with open(output_file, "w") as handle:
                handle.write(text + "\n")
        else:
            logger.info("\n%s", text)

    def print_model_aggregated_profile(self, module_depth: int = -1, top_modules: int = 1) -> None:
        """Log only the top-modules-per-depth part of the profile."""
        from deepshard.profiling.flops_profiler.report import aggregated_lines

        logger.info("\n%s", "\n".join(aggregated_lines(self, module_depth, top_modules)))

    # ------------------------------------------------------------------ hooks
    def _pre_hook(self, sync: Callable[[], None]) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any) -> None:
            sync()
            self._starts.setdefault(module, []).append(time.perf_counter())

        return hook

    def _post_hook(self, sync: Callable[[], None]) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: Any, output: Any) -> None:
            sync()
            starts = self._starts.get(module)
            if starts:
                self._durations[module] = (
                    self._durations.get(module, 0.0) + time.perf_counter() - starts.pop()
                )

        return hook


def _synchronizer() -> Callable[[], None]:
    """Wait for the device before reading the clock (a no-op on CPU)."""
    accelerator = get_accelerator()
    return accelerator.synchronize if accelerator.name == "cuda" else (lambda: None)


def get_model_profile(
    model: nn.Module,
    input_shape: tuple[int, ...] | None = None,
    args: list[Any] | tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    print_profile: bool = True,
    detailed: bool = True,
    module_depth: int = -1,
    top_modules: int = 1,
    warm_up: int = 1,
    as_string: bool = True,
    output_file: str | None = None,
    ignore_modules: list[type] | None = None,
    mode: str = "forward",
) -> tuple[Any, Any, Any]:
    """``(flops, macs, params)`` of one forward of ``model`` (DeepSpeed's function).

    The model is called ``warm_up`` times unprofiled, then once profiled, in eval mode, on
    ``torch.ones(input_shape)`` (in the model's dtype and device) or on ``args``/``kwargs``;
    ``mode="generate"`` calls ``model.generate`` instead. Strings (``"12.58 M"``) unless ``as_string`` is false.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mode not in ("forward", "generate"):
        raise ValueError(f"mode must be 'forward' or 'generate', got {mode!r}")
    kwargs = dict(kwargs or {})
    if input_shape is not None:
        if not isinstance(input_shape, tuple) or not input_shape:
            raise ValueError(f"input_shape must be a non-empty tuple, got {input_shape!r}")
        first = next(model.parameters(), None)
        dtype = first.dtype if first is not None else torch.get_default_dtype()
        device = first.device if first is not None else torch.device("cpu")
        args = [torch.ones(input_shape, dtype=dtype, device=device)]
    if not args and not kwargs:
        raise ValueError("give input_shape, or args and/or kwargs for the model's forward")
    call: Callable[..., Any] = getattr(model, "generate") if mode == "generate" else model  # noqa: B009 - nn.Module attributes type as Tensor
    prof = FlopsProfiler(model)
    model.eval()
    with torch.no_grad():
        for _ in range(warm_up):
            call(*args, **kwargs)
        prof.start_profile(ignore_list=ignore_modules)
        call(*args, **kwargs)
        prof.stop_profile()
    flops, macs, params = prof.get_total_flops(), prof.get_total_macs(), prof.get_total_params()
    if print_profile:
        prof.print_model_profile(warm_up, module_depth, top_modules, detailed, output_file)
    prof.end_profile()
    if as_string:
        return number_to_string(flops), macs_to_string(macs), params_to_string(params)  # type: ignore[arg-type]
    return flops, macs, params
