"""The text of a flops profile, laid out as DeepSpeed's ``print_model_profile`` prints it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from deepshard.profiling.flops_profiler.units import (
    DEFAULT_PRECISION,
    duration_to_string,
    flops_to_string,
    macs_to_string,
    number_to_string,
    params_to_string,
)

if TYPE_CHECKING:
    from deepshard.profiling.flops_profiler.profiler import FlopsProfiler, ModuleProfile

_LINE = "{:<70}  {:<8}"


def _pct(part: float, whole: float) -> float:
    return round(100 * part / whole, DEFAULT_PRECISION) if whole else 0


def _summary(prof: FlopsProfiler, profile_step: int) -> list[str]:
    flops, macs = int(prof.get_total_flops()), int(prof.get_total_macs())
    params, fwd = int(prof.get_total_params()), float(prof.get_total_duration())
    lines = [
        "",
        "-------------------------- DeepSpeed Flops Profiler --------------------------",
        f"Profile Summary at step {profile_step}:",
        "Notations:\ndata parallel size (dp_size), model parallel size(mp_size),\n"
        "number of parameters (params), number of multiply-accumulate operations(MACs),\n"
        "number of floating-point operations (flops), floating-point operations per second (FLOPS),\n"
        "fwd latency (forward propagation latency), bwd latency (backward propagation latency),\n"
        "step (weights update latency), iter latency (sum of fwd, bwd and step latency)\n",
    ]
    engine = prof.ds_engine
    if engine is not None:
        lines += [
            _LINE.format("world size: ", engine.dp_world_size),
            _LINE.format("data parallel size: ", engine.dp_world_size),
            _LINE.format("model parallel size: ", 1),
            _LINE.format("batch size per GPU: ", engine.train_micro_batch_size_per_gpu()),
        ]
    lines += [
        _LINE.format("params per GPU: ", params_to_string(params)),
        _LINE.format("params of model = params per GPU * mp_size: ", params_to_string(params)),
        _LINE.format("fwd MACs per GPU: ", macs_to_string(macs)),
        _LINE.format("fwd flops per GPU: ", number_to_string(flops)),
        _LINE.format("fwd flops of model = fwd flops per GPU * mp_size: ", number_to_string(flops)),
    ]
    times = engine._timers.window if engine is not None and engine.config.wall_clock_breakdown else None
    if times is not None:
        fwd = times["forward"]
    lines.append(_LINE.format("fwd latency: ", duration_to_string(fwd)))
    lines.append(
        _LINE.format(
            "fwd FLOPS per GPU = fwd flops per GPU / fwd latency: ",
            flops_to_string(flops / fwd if fwd else 0),
        )
    )
    if times is not None:
        factor = 2 + prof.recompute_fwd_factor
        bwd, step = times["backward"], times["step"]
        it = fwd + bwd + step
        lines += [
            _LINE.format("bwd latency: ", duration_to_string(bwd)),
            _LINE.format(
                f"bwd FLOPS per GPU = {factor:g} * fwd flops per GPU / bwd latency: ",
                flops_to_string(factor * flops / bwd if bwd else 0),
            ),
            _LINE.format(
                f"fwd+bwd FLOPS per GPU = {factor + 1:g} * fwd flops per GPU / (fwd+bwd latency): ",
                flops_to_string((factor + 1) * flops / (fwd + bwd) if fwd + bwd else 0),
            ),
            _LINE.format("step latency: ", duration_to_string(step)),
            _LINE.format("iter latency: ", duration_to_string(it)),
            _LINE.format(
                f"FLOPS per GPU = {factor + 1:g} * fwd flops per GPU / iter latency: ",
                flops_to_string((factor + 1) * flops / it if it else 0),
            ),
            _LINE.format(
                "samples/second: ",
                round(engine.train_micro_batch_size_per_gpu() * engine.dp_world_size / it, DEFAULT_PRECISION)
                if it
                else 0,
            ),
        ]
    return lines


def aggregated_lines(prof: FlopsProfiler, module_depth: int = -1, top_modules: int = 1) -> list[str]:
    """Top ``top_modules`` module classes by params, MACs and latency at each depth (DeepSpeed's table)."""
    profiles = prof.profiles()
    info: dict[int, dict[str, list[float]]] = {}

    def walk(name: str, module: nn.Module, depth: int) -> None:
        entry = info.setdefault(depth, {}).setdefault(type(module).__name__, [0, 0, 0.0])
        p = profiles[name]
        entry[0] += p.macs
        entry[1] += p.params
        entry[2] += p.duration
        for child_name, child in module.named_children():
            walk(f"{name}.{child_name}" if name else child_name, child, depth + 1)

    walk("", prof.model, 0)
    depth = len(info) - 1 if module_depth == -1 else module_depth
    lines = [f"Top {top_modules} modules in terms of params, MACs or fwd latency at different model depths:"]
    for d in range(min(depth, len(info))):
        ranked = info[d].items()

        def top(index: int, show: Any, ranked: Any = ranked) -> dict[str, str]:
            best = sorted(ranked, key=lambda kv: kv[1][index], reverse=True)[:top_modules]
            return {k: show(v[index]) for k, v in best}

        lines += [
            f"depth {d}:",
            f"    params      - {top(1, params_to_string)}",
            f"    MACs        - {top(0, macs_to_string)}",
            f"    fwd latency - {top(2, duration_to_string)}",
        ]
    return lines


def _module_repr(p: ModuleProfile, total: ModuleProfile, extra: str) -> str:
    items = [
        f"{params_to_string(p.params)} = {_pct(p.params, total.params):g}% Params",
        f"{macs_to_string(p.macs)} = {_pct(p.macs, total.macs):g}% MACs",
        f"{duration_to_string(p.duration)} = {_pct(p.duration, total.duration):g}% latency",
        flops_to_string(round(p.flops / p.duration, DEFAULT_PRECISION) if p.duration else 0),
    ]
    if extra:
        items.append(extra)
    return ", ".join(items)


def tree_lines(prof: FlopsProfiler) -> list[str]:
    """The model printed as ``print(model)`` does, each module's profile in place of its ``extra_repr``."""
    profiles = prof.profiles()
    total = profiles[""]

    def render(name: str, module: nn.Module) -> str:
        head = _module_repr(profiles[name], total, module.extra_repr())
        children = [
            f"({child_name}): " + render(f"{name}.{child_name}" if name else child_name, child)
            for child_name, child in module.named_children()
        ]
        if not children:
            return f"{type(module).__name__}({head})"
        body = "\n".join([head, *children]).replace("\n", "\n  ")
        return f"{type(module).__name__}(\n  {body}\n)"

    return render("", prof.model).split("\n")


def render_profile(
    prof: FlopsProfiler, profile_step: int, module_depth: int, top_modules: int, detailed: bool
) -> str:
    """Summary, aggregated table and (``detailed``) the annotated model tree, as one string."""
    lines = _summary(prof, profile_step)
    lines += ["", "----------------------------- Aggregated Profile per GPU -----------------------------"]
    lines += aggregated_lines(prof, module_depth, top_modules)
    if detailed:
        lines += [
            "",
            "------------------------------ Detailed Profile per GPU ------------------------------",
            "Each module profile is listed after its name in the following order: \nparams, percentage of total "
            "params, MACs, percentage of total MACs, fwd latency, percentage of total fwd latency, fwd FLOPS",
            "",
            "Note: 1. A module can have torch.nn.module or torch.nn.functional to compute logits (e.g. "
            "CrossEntropyLoss). They are not counted as submodules, thus not to be printed out. However they make "
            "up the difference between a parent's MACs (or latency) and the sum of its submodules'.\n2. Number of "
            "floating-point operations is a theoretical estimation, thus FLOPS computed using that could be larger "
            "than the maximum system throughput.\n",
            *tree_lines(prof),
        ]
    lines.append("------------------------------------------------------------------------------")
    return "\n".join(lines)
