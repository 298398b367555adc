"""What one forward costs, per module: ``torch.utils.flop_counter`` plus the ops it leaves out.

``torch.utils.flop_counter.FlopCounterMode`` counts the matrix products exactly (``mm``, ``addmm``,
``bmm``, ``baddbmm``, convolutions, the fused attention kernels): 2 flops per multiply-accumulate, so
their MACs are half their flops. Two gaps are filled here:

* CPU attention (``_scaled_dot_product_flash_attention_for_cpu``) is not in torch's table; it is
  counted with torch's own ``sdpa_flop_count`` (``Q Kᵀ`` and ``A V``: ``4·b·h·s_q·s_k·d`` for equal
  head dims; a causal mask does not change the count, as in torch and DeepSpeed).
* Element-wise and normalisation ops cost no MACs; they are counted with DeepSpeed's formulas:
  activations (ReLU, GELU, SiLU, ...) and softmax one flop per element, layer norm 5 per element with
  an affine transform (4 without). Additions, multiplications and embeddings are not counted
  (DeepSpeed counts ``torch.add``/``torch.mul`` calls, but not ``a + b``, so neither count is exact).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _per_element(input_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return _numel(input_shape)


def _layer_norm(
    input_shape: Any, normalized_shape: Any, weight: Any = None, *args: Any, **kwargs: Any
) -> int:
    return _numel(input_shape) * (5 if weight is not None else 4)


def _cpu_attention(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return int(sdpa_flop_count(query, key, value))


# ops whose flops are not multiply-accumulates (MACs = 0); everything from torch's table is a MAC op
NON_MAC_FORMULAS: dict[Any, Callable[..., int]] = {
    aten.relu: _per_element,
    aten.gelu: _per_element,
    aten.silu: _per_element,
    aten.elu: _per_element,
    aten.leaky_relu: _per_element,
    aten.hardtanh: _per_element,
    aten.sigmoid: _per_element,
    aten.tanh: _per_element,
    aten._softmax: _per_element,
    aten._log_softmax: _per_element,
    aten.native_layer_norm: _layer_norm,
}
MAC_FORMULAS: dict[Any, Callable[..., int]] = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
}


@functools.cache
def warm_up_counter() -> None:
    """Pay the one-time cost of the first dispatch under a ``FlopCounterMode`` (seconds: lazy imports)
    before anything is timed, so that it does not land in the first profiled module's latency."""
    with FlopCounterMode(display=False):
        torch.ones(2, 2) @ torch.ones(2, 2)


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` (not displaying) that also counts the ops of :data:`NON_MAC_FORMULAS` and CPU attention."""
    return FlopCounterMode(display=False, custom_mapping={**MAC_FORMULAS, **NON_MAC_FORMULAS})


def split_counts(per_op: dict[Any, int]) -> tuple[int, int]:
    """``(flops, macs)`` of one module's per-op flop counts (as ``FlopCounterMode.get_flop_counts`` gives them)."""
    flops = sum(per_op.values())
    mac_flops = sum(v for op, v in per_op.items() if op not in NON_MAC_FORMULAS)
    return int(flops), int(mac_flops // 2)
