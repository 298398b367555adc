"""Weight-only group-wise quantization: :class:`QuantizedLinear` (int8, or int4 packed two per byte).

Each row of an ``[out, in]`` weight is cut into groups of ``group_size`` consecutive inputs; a group
stores integers ``q`` and one ``scale`` (and, asymmetric, one ``zero``) so that ``w ~ (q - zero) * scale``:

- symmetric, ``b`` bits: ``scale = max|w| / (2**(b-1) - 1)``, ``q = round(w / scale)`` in
  ``[-(2**(b-1) - 1), 2**(b-1) - 1]``, zero 0;
- asymmetric (DeepSpeed's mode): ``scale = (max - min) / (2**b - 1)``, ``zero = round(-min / scale)``,
  ``q = clamp(round(w / scale) + zero, 0, 2**b - 1)``.

Rounding to nearest bounds the error of every weight by ``scale / 2`` (symmetric); asymmetric adds the
rounding of the zero point, which can push the top of a group's range one step into the clamp, so its
bound is ``scale``. Tests check both bounds.
Storage: ``b/8`` bytes per weight plus two (one) floats per group; the forward dequantizes the
weight to the activation dtype and runs one matmul (bandwidth saved in storage, not compute).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from deepshard.inference.config import PostInitQuantEntry


def quantize(weight: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(q [out, in] int8/uint8, scale [out, groups], zero [out, groups] | None)`` of a float ``weight``."""
    out_f, in_f = weight.shape
    if in_f % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide the layer's input size {in_f}; pick a divisor of {in_f}."
        )
    w = weight.detach().to(torch.float32).reshape(out_f, in_f // group_size, group_size)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = w.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny) / qmax
        q = torch.round(w / scale[..., None]).clamp(-qmax, qmax).to(torch.int8)
        return q.reshape(out_f, in_f), scale, None
    qmax = 2**bits - 1
    lo = w.amin(-1).clamp_max(0.0)
    hi = w.amax(-1).clamp_min(0.0)
    scale = ((hi - lo) / qmax).clamp_min(torch.finfo(torch.float32).tiny)
    zero = torch.round(-lo / scale).clamp(0, qmax)
    q = (torch.round(w / scale[..., None]) + zero[..., None]).clamp(0, qmax).to(torch.uint8)
    return q.reshape(out_f, in_f), scale, zero


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two 4-bit values per byte along the last dim: element ``2i`` in the low nibble, ``2i+1`` in the high."""
    u = q.to(torch.int16) & 0xF
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of :func:`pack_int4`; ``signed`` restores two's-complement nibbles."""
    p = packed.to(torch.int16)
    both = torch.stack((p & 0xF, (p >> 4) & 0xF), dim=-1).flatten(-2)
    if signed:
        both = torch.where(both >= 8, both - 16, both)
    return both


class QuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` whose weight is stored group-wise in 8 or 4 bits.

    Buffers: ``qweight`` (int8 ``[out, in]``, uint8 ``[out, in]`` asymmetric, or uint8 ``[out, in/2]``
    for 4 bits), ``scale`` ``[out, groups]`` fp32, ``zero`` ``[out, groups]`` (asymmetric only) and
    ``bias`` in the activation dtype.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    bias: torch.Tensor | None

    def __init__(self, linear: nn.Linear, *, bits: int, group_size: int, symmetric: bool) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"num_bits={bits}: QuantizedLinear stores 8 or 4 bits per weight.")
        if bits == 4 and group_size % 2:
            raise ValueError(f"group_size={group_size}: 4-bit packing needs an even group size.")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.dtype = linear.weight.dtype
        q, scale, zero = quantize(linear.weight, bits, group_size, symmetric)
        self.register_buffer("qweight", pack_int4(q) if bits == 4 else q)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantized(self) -> torch.Tensor:
        """The float weight ``[out, in]`` in the layer's dtype: ``(q - zero) * scale``."""
        q = unpack_int4(self.qweight, self.symmetric) if self.bits == 4 else self.qweight
        g = q.reshape(self.out_features, -1, self.group_size).to(torch.float32)
        if self.zero is not None:
            g = g - self.zero[..., None]
        return (g * self.scale[..., None]).reshape(self.out_features, self.in_features).to(self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized(), self.bias)

    def storage_bytes(self) -> int:
        """Bytes held by the quantized weight, its scales and zero points (the bias excluded)."""
        held = [t for t in (self.qweight, self.scale, self.zero) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, symmetric={self.symmetric}")


def quantize_linears(model: nn.Module, rules: Mapping[str, PostInitQuantEntry]) -> list[str]:
    """Replace every ``nn.Linear`` whose qualified name contains a key of ``rules`` by a :class:`QuantizedLinear`.

    Returns the names replaced. Raises ``ValueError`` when a module matches two keys (as DeepSpeed does)
    or when no module matches a key (a typo would otherwise quantize nothing).
    """
    matched: dict[str, str] = {}
    used: set[str] = set()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        keys = [k for k in rules if k in name]
        if len(keys) > 1:
            raise ValueError(f"quant.weight.post_init_quant: module '{name}' matches several keys {keys}; make them disjoint.")
        if keys:
            matched[name] = keys[0]
            used.add(keys[0])
    missing = [k for k in rules if k not in used]
    if missing:
        raise ValueError(
            f"quant.weight.post_init_quant: key(s) {missing} match no nn.Linear of the model; names look like "
            f"{[n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:4]}."
        )
    for name, key in matched.items():
        rule = rules[key]
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, QuantizedLinear(getattr(parent, child), bits=rule.num_bits,
                                               group_size=rule.group_size, symmetric=rule.symmetric))
    return list(matched)
