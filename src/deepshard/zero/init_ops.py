"""Which torch operations ``zero.Init`` lets touch a partitioned parameter, and how they touch it.

Inside :class:`deepshard.zero.Init` every torch call on a parameter goes through a ``TorchFunctionMode``
(:class:`deepshard.zero.init_partition.InitMode`). This module classifies a call: an initialiser that
overwrites its whole target (replayed exactly on a materialised full tensor), an in-place write, a read of
the values, or something passive; and it words the errors for calls a partitioned parameter cannot serve.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class ZeroInitError(ValueError, RuntimeError):
    """A model built under ``zero.Init`` did something a partitioned parameter cannot serve (a user error:
    a ``ValueError`` with the fix; also a ``RuntimeError``, which it was before, for callers that catch that)."""


_init = torch.nn.init
# torch.nn.init functions overwrite their whole target; some dispatch to the mode themselves, the others
# reach it through the tensor methods they call
_INIT_FUNCTIONS = frozenset(
    {
        _init.uniform_, _init.normal_, _init.trunc_normal_, _init.constant_, _init.ones_, _init.zeros_,
        _init.eye_, _init.dirac_, _init.xavier_uniform_, _init.xavier_normal_, _init.kaiming_uniform_,
        _init.kaiming_normal_, _init.orthogonal_, _init.sparse_,
    }
)  # fmt: skip
_INIT_NAMES = frozenset(f.__name__ for f in _INIT_FUNCTIONS)
# in-place methods that overwrite every element (randomly or not): run on a materialised full tensor, so that
# the random stream advances as in a normal construction and later writes in the same init code find it whole
_FILLS = frozenset(
    {
        "normal_", "uniform_", "random_", "bernoulli_", "exponential_", "geometric_", "cauchy_",
        "log_normal_", "zero_", "fill_", "copy_",
    }
)  # fmt: skip
# in-place elementwise methods: each output row depends only on the same row of self and the operands
_ELEMENTWISE = frozenset(
    {
        "add_", "sub_", "subtract_", "mul_", "multiply_", "div_", "divide_",
        "true_divide_", "clamp_", "clamp_min_", "clamp_max_", "clip_", "erfinv_", "erf_", "neg_",
        "negative_", "abs_", "exp_", "expm1_", "log_", "log1p_", "sqrt_", "rsqrt_", "pow_", "square_",
        "tanh_", "sigmoid_", "sin_", "cos_", "atan_", "sign_", "floor_", "ceil_", "round_", "trunc_",
        "frac_", "reciprocal_", "relu_", "addcmul_", "addcdiv_", "lerp_", "masked_fill_", "nan_to_num_",
        "fmod_", "remainder_",
    }
)  # fmt: skip
# in-place methods that change no values
_PASSIVE = frozenset({"requires_grad_", "share_memory_", "detach_"})
# methods that return the tensor in another dtype / on another device (Module.to, .half(), ...)
CONVERSIONS = frozenset({"to", "type", "half", "float", "double", "bfloat16", "cuda", "cpu"})


def op_tensors(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterable[torch.Tensor]:
    """Tensors among the arguments (one level of lists/tuples, as in ``torch.cat`` and ``out=``)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, list | tuple):
            for item in value:
                if isinstance(item, torch.Tensor):
                    yield item


def classify(
    func: Callable[..., Any], name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[Any, str | None]:
    """(written tensor, kind) of an operation; kind ``None`` for operations that write nothing.

    Kinds: ``fill`` (overwrites every element, maybe randomly), ``rows`` (elementwise update),
    ``setitem`` (indexed assignment), ``unsupported`` (any other in-place change).
    """
    if func in _INIT_FUNCTIONS or (name in _INIT_NAMES and "tensor" in kwargs and not args):
        # the second form: a torch.nn.init function replaced by a wrapper (transformers guards them with
        # its own) dispatches to the mode under the wrapper's identity, its tensor passed by keyword
        return (args[0] if args else kwargs.get("tensor")), "fill"
    if name == "__setitem__":
        return args[0], "setitem"
    if args and isinstance(args[0], torch.Tensor) and name.endswith("_") and not name.startswith("__"):
        if name in _FILLS:
            return args[0], "fill"
        if name in _ELEMENTWISE:
            return args[0], "rows"
        if name in _PASSIVE:
            return None, None
        return args[0], "unsupported"
    out = kwargs.get("out")
    if isinstance(out, torch.Tensor):
        return out, "fill"
    if isinstance(out, list | tuple) and any(isinstance(o, torch.Tensor) for o in out):
        return out[0], "unsupported"
    return None, None


def covers_all(key: Any) -> bool:
    """Whether an index selects every element (``t[...]``, ``t[:]``)."""
    if key is Ellipsis:
        return True
    if isinstance(key, slice):
        return key.start in (None, 0) and key.stop is None and key.step in (None, 1)
    if isinstance(key, tuple):
        return all(covers_all(k) for k in key)
    return False


def same_or(result: Any, target: Any) -> Any:
    """In-place operations return their target: hand back the caller's object, not our stand-in."""
    return target if isinstance(result, torch.Tensor) and result.shape == target.shape else result


_FIX = (
    "Do this before the module is assigned into its parent module, or after deepshard.initialize() inside "
    "`with deepshard.zero.GatheredParameters(param, modifier_rank=0):`"
)


def write_error(what_param: str, op: str, whole: bool) -> ZeroInitError:
    what = "an in-place operation" if whole else "a write through an index or a reshaped view"
    return ZeroInitError(
        f"zero.Init: '{op}' is {what} on parameter {what_param}, which is already partitioned "
        f"(this rank holds only its rows); it cannot be reproduced on the rows. {_FIX}."
    )


def read_error(what_param: str, op: str) -> ZeroInitError:
    return ZeroInitError(
        f"zero.Init: '{op}' reads the values of parameter {what_param}, which is partitioned (this rank "
        f"holds only its rows; the parameter shows NaN). {_FIX}."
    )
