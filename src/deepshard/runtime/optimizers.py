"""Build the optimizer named by the ``optimizer`` section of ds_config.json.

Names resolve the way DeepSpeed's ``_configure_basic_optimizer`` resolves them:

* ``Adam`` / ``AdamW`` follow DeepSpeed's ``FusedAdam`` semantics on top of ``torch.optim.Adam(W)``:
  ``adam_w_mode`` defaults to ``True``, so plain ``"Adam"`` means *decoupled* weight decay (AdamW);
  ``"AdamW"`` always does. ``adam_w_mode: false`` gives L2-regularised ``torch.optim.Adam``. Unless
  ``torch_adam: true``, ``weight_decay`` defaults to ``0.0`` (FusedAdam's default, not AdamW's ``1e-2``).
* ``Adagrad`` is ``torch.optim.Adagrad``; ``Lamb`` and ``Lion`` are :class:`Lamb` and :class:`Lion`.
* DeepSpeed's communication-compressed and muP optimizers (``OneBitAdam``, ``ZeroOneAdam``,
  ``OneBitLamb``, ``MuAdam``, ``MuAdamW``, ``MuSGD``, ``Muon``) raise ``NotSupportedYetError``.
* Any other name is a ``torch.optim`` class (``SGD``, ``RMSprop``, ``NAdam``, ...), matched
  case-insensitively.

Where PyTorch has a fused kernel (Adam, AdamW, SGD, Adagrad on CPU and CUDA) it is chosen unless the
config sets ``fused`` or ``foreach`` itself: on CPU the fused AdamW step is several times faster than
the foreach one (docs/optimizers.md has the measurement).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from deepshard.config.errors import ConfigError, NotSupportedYetError, did_you_mean
from deepshard.runtime._lamb_lion import Lamb, Lion
from deepshard.runtime._params import check_param_names, signature_params

__all__ = ["DeepSpeedCPUAdam", "FusedAdam", "Lamb", "Lion", "build_optimizer", "optimizer_choices"]

logger = logging.getLogger(__name__)

_NOT_SUPPORTED = ("OneBitAdam", "ZeroOneAdam", "OneBitLamb", "MuAdam", "MuAdamW", "MuSGD", "Muon")

# DeepSpeed-only keys with no torch counterpart, accepted at the one value torch's behaviour matches.
# set_grad_none=True: torch's zero_grad() already sets grads to None. bias_correction=True: torch's
# Adam always corrects. amsgrad=False: FusedLamb refuses AMSGrad too.
_FIXED_KEYS: dict[str, dict[str, bool]] = {
    "adam": {"bias_correction": True, "set_grad_none": True},
    "adamw": {"bias_correction": True, "set_grad_none": True},
    "lamb": {"amsgrad": False},
    "lion": {"set_grad_none": True},
}
_ADAM_MODE_KEYS = ("adam_w_mode", "torch_adam")

_FUSED_CLASSES: tuple[type[Optimizer], ...] = (
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.SGD,
    torch.optim.Adagrad,
)
_FUSED_DEVICES = frozenset({"cpu", "cuda"})
_FUSED_DTYPES = frozenset({torch.float64, torch.float32, torch.float16, torch.bfloat16})


def _torch_optimizers() -> dict[str, type[Optimizer]]:
    """``torch.optim`` optimizer classes by lower-cased name."""
    found: dict[str, type[Optimizer]] = {}
    for name in dir(torch.optim):
        obj = getattr(torch.optim, name)
        if isinstance(obj, type) and issubclass(obj, Optimizer) and obj is not Optimizer:
            found[name.lower()] = obj
    return found


def optimizer_choices() -> list[str]:
    """Every optimizer ``type`` that :func:`build_optimizer` accepts, in display spelling."""
    torch_names = [cls.__name__ for cls in _torch_optimizers().values()]
    return sorted({"Adam", "AdamW", "Adagrad", "Lamb", "Lion", *torch_names}, key=str.lower)


def _param_groups(model_parameters: Iterable[Tensor] | Iterable[dict[str, Any]]) -> list[Any]:
    """Materialise the parameters once (they may be a generator) and keep their group structure."""
    if isinstance(model_parameters, Tensor):
        raise TypeError(
            "model_parameters must be an iterable of tensors or param-group dicts, not one tensor"
        )
    groups: list[Any] = []
    for item in model_parameters:
        if isinstance(item, dict):
            params = item["params"]
            group = dict(item)
            group["params"] = [params] if isinstance(params, Tensor) else list(params)
            groups.append(group)
        else:
            groups.append(item)
    return groups


def _tensors(groups: list[Any]) -> list[Tensor]:
    """The parameter tensors of ``groups`` (entries may be ``(name, tensor)`` pairs, as torch allows)."""
    items = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]
    return [p[1] if isinstance(p, tuple) else p for p in items]


def _fused_ok(tensors: list[Tensor]) -> bool:
    """Whether PyTorch's fused optimizer kernels accept every tensor (device and dtype)."""
    return bool(tensors) and all(
        p.device.type in _FUSED_DEVICES and p.dtype in _FUSED_DTYPES for p in tensors
    )


def _pop_flag(kwargs: dict[str, Any], key: str, default: bool) -> bool:
    value = kwargs.pop(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"optimizer.params.{key} must be true or false, got {value!r}.")
    return value


def _resolve(type_name: str, kwargs: dict[str, Any]) -> type[Optimizer]:
    """Pick the class for ``type_name``; consume the DeepSpeed-only keys from ``kwargs``."""
    key = type_name.lower()
    if "max_grad_norm" in kwargs:
        raise ConfigError(
            "optimizer.params.max_grad_norm is not supported (as in DeepSpeed); set the top-level "
            "'gradient_clipping' key instead."
        )
    if key in {n.lower() for n in _NOT_SUPPORTED}:
        raise NotSupportedYetError(
            f"optimizer.type '{type_name}' is a DeepSpeed optimizer that deepshard does not implement yet. "
            f"Use 'Adam', 'AdamW', 'Lamb' or 'Lion' instead."
        )
    torch_classes = _torch_optimizers()
    cls: type[Optimizer]
    if key in ("adam", "adamw"):
        cls, owner = torch.optim.AdamW, type_name  # Adam and AdamW take the same keywords
        valid = set(signature_params(cls)) | set(_FIXED_KEYS[key]) | set(_ADAM_MODE_KEYS)
    elif key in ("lamb", "lion"):
        cls = Lamb if key == "lamb" else Lion
        owner, valid = cls.__name__, set(signature_params(cls)) | set(_FIXED_KEYS[key])
    elif key in torch_classes:
        cls = torch_classes[key]
        owner, valid = f"torch.optim.{cls.__name__}", set(signature_params(cls))
    else:
        choices = optimizer_choices()
        raise ConfigError(
            f"optimizer.type '{type_name}' is not a known optimizer.{did_you_mean(type_name, choices)} "
            f"Choose one of: {', '.join(choices)} (DeepSpeed-specific, or any torch.optim class)."
        )
    check_param_names("optimizer", owner, kwargs, valid)

    for fixed, required in _FIXED_KEYS.get(key, {}).items():
        if _pop_flag(kwargs, fixed, required) != required:
            raise NotSupportedYetError(
                f"optimizer.params.{fixed}={str(not required).lower()} is not supported by deepshard's "
                f"{type_name}; remove the key or set it to {str(required).lower()}."
            )
    if key in ("adam", "adamw"):
        torch_adam = _pop_flag(kwargs, "torch_adam", False)
        adam_w_mode = _pop_flag(kwargs, "adam_w_mode", True)
        # DeepSpeed: the name AdamW forces decoupled decay; Adam follows adam_w_mode (default True).
        cls = torch.optim.AdamW if key == "adamw" or adam_w_mode else torch.optim.Adam
        if not torch_adam:
            kwargs.setdefault("weight_decay", 0.0)  # FusedAdam / DeepSpeedCPUAdam default
    return cls


class FusedAdam(torch.optim.Adam):
    """DeepSpeed's ``deepspeed.ops.adam.FusedAdam``: ``torch.optim.Adam`` with DeepSpeed's arguments.

    ``adam_w_mode=True`` (the default) is decoupled weight decay (AdamW), ``False`` L2 regularisation;
    ``weight_decay`` defaults to ``0``. PyTorch's fused kernel is used where it exists for the
    parameters' device and dtype. Only DeepSpeed's defaults of ``bias_correction`` (``True``) and
    ``amsgrad`` (``False``, which FusedAdam refuses too) are accepted.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        adam_w_mode: bool = True,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        set_grad_none: bool = True,
    ) -> None:
        del set_grad_none  # torch's zero_grad() sets gradients to None already
        _check_adam_flags(type(self).__name__, bias_correction, amsgrad)
        groups = _param_groups(params)
        super().__init__(
            groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,  # type: ignore[arg-type]
            decoupled_weight_decay=adam_w_mode, fused=_fused_ok(_tensors(groups)) or None,
        )  # fmt: skip


class DeepSpeedCPUAdam(FusedAdam):
    """DeepSpeed's ``deepspeed.ops.adam.DeepSpeedCPUAdam`` (its C++ kernel): PyTorch's fused Adam(W) on the
    host, which deepshard uses for every offloaded step (no compile step). ``adamw_mode`` is
    ``adam_w_mode``; optimizer states stay fp32 (``fp32_optimizer_states=False`` is refused)."""

    def __init__(
        self,
        model_params: Iterable[Any],
        lr: float = 1e-3,
        bias_correction: bool = True,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        adamw_mode: bool = True,
        fp32_optimizer_states: bool = True,
    ) -> None:
        if not fp32_optimizer_states:
            raise NotSupportedYetError(
                "DeepSpeedCPUAdam(fp32_optimizer_states=False) keeps optimizer states in the parameters' dtype, "
                "which deepshard does not implement; leave it at True."
            )
        super().__init__(model_params, lr, bias_correction, betas, eps, adamw_mode, weight_decay, amsgrad)


def _check_adam_flags(owner: str, bias_correction: bool, amsgrad: bool) -> None:
    if not bias_correction:
        raise NotSupportedYetError(f"{owner}(bias_correction=False) is not supported by deepshard; leave it True.")
    if amsgrad:
        raise NotSupportedYetError(f"{owner}(amsgrad=True) is not supported (DeepSpeed's FusedAdam refuses it too).")


def build_optimizer(
    type_name: str,
    params: Mapping[str, Any],
    model_parameters: Iterable[Tensor] | Iterable[dict[str, Any]],
) -> Optimizer:
    """Build the optimizer of a config's ``optimizer`` section.

    Args:
        type_name: ``optimizer.type``, e.g. ``"AdamW"``, ``"Lamb"`` or any ``torch.optim`` class name.
        params: ``optimizer.params``: constructor keywords plus DeepSpeed's extras (``adam_w_mode``,
            ``torch_adam``, ...). JSON lists for ``betas`` are accepted.
        model_parameters: tensors, or param-group dicts, as for any ``torch.optim`` optimizer.

    Returns:
        The optimizer, on PyTorch's fused kernel when one exists for the parameters' device and dtype
        and the config does not set ``fused``/``foreach``.

    Raises:
        ConfigError: unknown type or parameter (with a suggestion), ``max_grad_norm``, an unresolved
            ``"auto"``, or a value the constructor rejects.
        NotSupportedYetError: a DeepSpeed optimizer or option deepshard does not implement.
    """
    kwargs = dict(params)
    cls = _resolve(type_name, kwargs)
    if isinstance(kwargs.get("betas"), list):
        kwargs["betas"] = tuple(kwargs["betas"])
    groups = _param_groups(model_parameters)
    if (
        issubclass(cls, _FUSED_CLASSES)
        and "fused" not in kwargs
        and "foreach" not in kwargs
        and not kwargs.get("differentiable", False)
        and _fused_ok(_tensors(groups))
    ):
        kwargs["fused"] = True
    try:
        optimizer = cls(groups, **kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"optimizer '{type_name}' ({cls.__name__}) rejected optimizer.params {dict(params)}: {exc}. "
            f"Fix the value in the config."
        ) from exc
    impl = "fused" if kwargs.get("fused") else "foreach" if kwargs.get("foreach") else "default"
    logger.info("optimizer %s -> %s (%s implementation)", type_name, cls.__name__, impl)
    return optimizer
