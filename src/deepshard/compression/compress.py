"""DeepSpeed's compression entry points: :func:`init_compression`, :func:`redundancy_clean`, :func:`student_initialization`.

``init_compression`` replaces every compressible layer by its compressed form (sharing the parameters)
and configures the techniques of the groups that select it; techniques start at their ``schedule_offset``
under :class:`~deepshard.compression.scheduler.CompressionScheduler`. After training, ``redundancy_clean``
bakes every technique into plain weights and, where ``related_modules`` are given, cuts pruned rows,
heads and channels out of both the pruned layer and the layers that consume its outputs, so the model has
fewer parameters and computes the same function as the masked one.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from deepshard.compression.layers import (
    CompressedConv2d,
    CompressedEmbedding,
    CompressedLinear,
    Technique,
    keep_batchnorm_channels,
)
from deepshard.compression.patterns import GroupPlan, plan
from deepshard.compression.pruning import parse_block
from deepshard.compression.quantizers import Rounding
from deepshard.config._compression import CompressionConfig, load_compression_config

logger = logging.getLogger(__name__)

_METHODS = {
    Technique.ROW_PRUNING: "enable_row_pruning",
    Technique.HEAD_PRUNING: "enable_head_pruning",
    Technique.CHANNEL_PRUNING: "enable_channel_pruning",
}


def _no_mpu(mpu: Any) -> None:
    if mpu is not None:
        raise NotImplementedError(
            "compression of Megatron-style (mpu) parallel layers is not implemented in "
            "deepshard; pass mpu=None."
        )


def _unwrap(model: nn.Module) -> nn.Module:
    module = getattr(model, "module", None)
    return module if isinstance(module, nn.Module) else model


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _wrap_all(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            _set(model, name, CompressedLinear.from_linear(module))
        elif type(module) is nn.Conv2d:
            _set(model, name, CompressedConv2d.from_conv(module))
        elif type(module) is nn.Embedding:
            _set(model, name, CompressedEmbedding.from_embedding(module))


def _configure(module: nn.Module, gp: GroupPlan, config: CompressionConfig, name: str) -> None:
    shared = getattr(config, gp.technique.value).shared_parameters
    t = gp.technique
    where = f"compression_training.{t.value}.different_groups.{gp.name}: module '{name}'"
    if isinstance(module, nn.BatchNorm2d):
        return  # BatchNorm takes no technique itself; it is shrunk as a related module of channel pruning
    if t is Technique.WEIGHT_QUANTIZATION:
        module.enable_weight_quantization(  # type: ignore[operator]
            gp.params["start_bits"],
            gp.params["target_bits"],
            gp.params["quantization_period"],
            shared.quantize_weight_in_forward,
            shared.quantization_type == "symmetric",
            shared.quantize_groups,
            Rounding(shared.rounding),
        )
        return
    if isinstance(module, CompressedEmbedding):
        raise ValueError(
            f"{where} is an Embedding, which takes only weight_quantization; narrow the pattern."
        )
    if t is Technique.ACTIVATION_QUANTIZATION:
        module.enable_activation_quantization(  # type: ignore[operator]
            gp.params["bits"], shared.quantization_type == "symmetric", shared.range_calibration == "static"
        )
    elif t is Technique.SPARSE_PRUNING:
        if shared.method == "snip_momentum" and any(x in name for x in shared.excluded_modules):
            return
        ratio = shared.dense_ratio if shared.method == "snip_momentum" else gp.params["dense_ratio"]
        block = parse_block(shared.block_pattern) if shared.method == "snip_momentum" else (1, 1)
        module.enable_sparse_pruning(ratio, shared.method, block)  # type: ignore[operator]
    else:
        method = getattr(module, _METHODS[t], None)
        if method is None:
            raise ValueError(
                f"{where} is a {type(module).__name__}, which does not support {t.value} "
                "(row/head pruning: Linear; channel pruning: Conv2d); narrow the pattern."
            )
        if t is Technique.HEAD_PRUNING:
            method(gp.params["dense_ratio"], shared.method, shared.num_heads)
        else:
            method(gp.params["dense_ratio"], shared.method)


def init_compression(
    model: nn.Module, deepspeed_config: Any, teacher_model: nn.Module | None = None, mpu: Any = None
) -> nn.Module:
    """Prepare ``model`` for compression training as DeepSpeed's ``init_compression``; returns ``model``.

    Args:
        model: the model (or an engine-like wrapper with ``.module``); modified in place.
        deepspeed_config: a ds_config dict or JSON path (only ``compression_training`` is read).
        teacher_model: required with ``layer_reduction``: the student is initialised from it first.
        mpu: must be ``None`` (Megatron parallel layers are not supported).

    Build the optimizer after this call: ``topk`` pruning adds learnable score parameters.
    """
    _no_mpu(mpu)
    config = load_compression_config(deepspeed_config)
    c_model = _unwrap(model)
    if config.layer_reduction.enabled:
        if teacher_model is None:
            raise ValueError(
                "compression_training.layer_reduction is enabled: pass teacher_model to init_compression."
            )
        student_initialization(c_model, teacher_model, config)
    plans = plan(c_model, config)
    _wrap_all(c_model)
    for gp in plans:
        for names in gp.modules:
            for name in names:
                _configure(c_model.get_submodule(name), gp, config, name)
    logger.info(
        "init_compression: %s",
        ", ".join(f"{gp.technique.value}/{gp.name}: {sum(map(len, gp.modules))} modules" for gp in plans)
        or "nothing",
    )
    return model


_CLEAN_ORDER = [
    Technique.WEIGHT_QUANTIZATION,
    Technique.SPARSE_PRUNING,
    Technique.ROW_PRUNING,
    Technique.HEAD_PRUNING,
    Technique.CHANNEL_PRUNING,
    Technique.ACTIVATION_QUANTIZATION,
]


def _fix(module: nn.Module, technique: Technique, dim_reduction: bool) -> torch.Tensor | None:
    """Bake ``technique`` into ``module``; returns the kept mask of a structured pruning."""
    if technique is Technique.ACTIVATION_QUANTIZATION or isinstance(module, nn.BatchNorm2d):
        return None  # inputs keep being quantized: nothing to bake
    if technique in module.masks:  # type: ignore[operator]
        module.activate(technique)  # type: ignore[operator]  # an l1 mask not yet started is computed now
    if technique is Technique.WEIGHT_QUANTIZATION:
        module.fix_weight_quantization()  # type: ignore[operator]
        return None
    if technique is Technique.SPARSE_PRUNING:
        module.fix_sparse_pruning()  # type: ignore[operator]
        return None
    fixer = {
        Technique.ROW_PRUNING: "fix_row_pruning",
        Technique.HEAD_PRUNING: "fix_head_pruning",
        Technique.CHANNEL_PRUNING: "fix_channel_pruning",
    }[technique]
    return getattr(module, fixer)(dim_reduction)  # type: ignore[no-any-return]


def _shrink_related(
    module: nn.Module, technique: Technique, keep: torch.Tensor, pruned: nn.Module, name: str
) -> None:
    """Cut ``related`` module ``module`` down to the outputs its pruned partner ``pruned`` still produces."""
    if technique is Technique.ROW_PRUNING and isinstance(module, CompressedLinear):
        module.keep_inputs(keep)
    elif technique is Technique.HEAD_PRUNING and isinstance(module, CompressedLinear):
        heads = keep.numel()
        if module.out_features % heads:
            raise ValueError(
                f"related module '{name}' has {module.out_features} outputs, not a multiple of "
                f"num_heads={heads}; related modules of head pruning are the q/k/v projections."
            )
        module.keep_outputs(keep.repeat_interleave(module.out_features // heads))
    elif technique is Technique.CHANNEL_PRUNING and isinstance(module, CompressedConv2d):
        module.keep_inputs(keep)
    elif technique is Technique.CHANNEL_PRUNING and isinstance(module, nn.BatchNorm2d):
        keep_batchnorm_channels(module, keep)
    else:
        raise ValueError(
            f"related module '{name}' ({type(module).__name__}) cannot be shrunk after "
            f"{technique.value} of {type(pruned).__name__}; related modules are the Linear layers "
            "consuming pruned rows, the q/k/v of a head-pruned projection, or the Conv2d/BatchNorm2d "
            "after a channel-pruned conv."
        )


def redundancy_clean(model: nn.Module, deepspeed_config: Any, mpu: Any = None) -> nn.Module:
    """Bake the compression into the weights and physically remove pruned rows, heads and channels.

    Techniques are fixed in DeepSpeed's order (weight quantization, sparse, row, head, channel pruning).
    A structured pruning whose group names ``related_modules`` shrinks the pruned layer and its related
    layers; without them, pruned entries are zeroed in place (the shapes stay). Returns ``model``.
    """
    _no_mpu(mpu)
    config = load_compression_config(deepspeed_config)
    c_model = _unwrap(model)
    plans = sorted(plan(c_model, config), key=lambda gp: _CLEAN_ORDER.index(gp.technique))
    for gp in plans:
        reduce = bool(gp.related)
        for i, names in enumerate(gp.modules):
            kept = [(name, _fix(c_model.get_submodule(name), gp.technique, reduce)) for name in names]
            if not reduce:
                continue
            for rel_names in gp.related[i]:
                for (pruned_name, keep), rel_name in zip(kept, rel_names):
                    if keep is not None:
                        _shrink_related(
                            c_model.get_submodule(rel_name),
                            gp.technique,
                            keep,
                            c_model.get_submodule(pruned_name),
                            rel_name,
                        )
    return model


def student_initialization(student_model: nn.Module, teacher_model: nn.Module, deepspeed_config: Any) -> None:
    """Copy teacher layers ``teacher_layer[i]`` into student layer ``i``, and ``other_module_name`` modules whole.

    Layers are ``<module_name_prefix>.<index>``. Parameters are copied in order and must match in shape:
    the student is the same architecture with fewer layers.
    """
    cfg = load_compression_config(deepspeed_config).layer_reduction
    if not cfg.module_name_prefix or not cfg.teacher_layer:
        raise ValueError("compression_training.layer_reduction needs module_name_prefix and teacher_layer.")
    pairs = [
        (f"{cfg.module_name_prefix}.{s}", f"{cfg.module_name_prefix}.{t}")
        for s, t in enumerate(cfg.teacher_layer)
    ]
    pairs += [(name, name) for name in cfg.other_module_name]
    for s_name, t_name in pairs:
        try:
            s_mod, t_mod = student_model.get_submodule(s_name), teacher_model.get_submodule(t_name)
        except AttributeError as exc:
            raise ValueError(
                f"compression_training.layer_reduction: {exc}; check module_name_prefix, teacher_layer "
                "and other_module_name against the models' module names."
            ) from None
        s_params, t_params = list(s_mod.parameters()), list(t_mod.parameters())
        if [p.shape for p in s_params] != [p.shape for p in t_params]:
            raise ValueError(
                f"layer_reduction: student '{s_name}' and teacher '{t_name}' have different parameter "
                "shapes; the student must be the teacher's architecture with fewer layers."
            )
        with torch.no_grad():
            for s, t in zip(s_params, t_params):
                s.copy_(t)
