"""Compression-aware layers: ``nn.Linear`` / ``nn.Conv2d`` / ``nn.Embedding`` subclasses that quantize and mask.

A layer is *configured* for a technique by ``enable_*`` (at :func:`~deepshard.compression.compress.init_compression`)
and becomes *active* when the scheduler reaches the technique's ``schedule_offset`` (:meth:`activate`). The
forward then applies, in DeepSpeed's order: weight fake-quantization (``quantize_weight_in_forward``),
sparse mask, row / channel mask, head mask, input quantization. Masks multiply the weight, so masked
entries get zero gradient; ``l1`` masks are computed from the weights when the technique activates, ``topk``
masks from learned scores at every forward. ``fix_*`` bakes a technique into the weights
(:func:`~deepshard.compression.compress.redundancy_clean`), and for row/head/channel pruning can cut the
pruned rows, heads or channels out of the tensors, which makes the layer smaller and faster.
Parameter and buffer names follow DeepSpeed (``sparse_mask_scores``, ``row_pruning_mask``, ...).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from deepshard.compression import pruning
from deepshard.compression.quantizers import (
    ActivationQuantizer,
    Rounding,
    fake_quantize_weight,
    quantize_weight,
)


class Technique(enum.Enum):
    """A compression technique of ``compression_training`` (the config's section name)."""

    WEIGHT_QUANTIZATION = "weight_quantization"
    ACTIVATION_QUANTIZATION = "activation_quantization"
    SPARSE_PRUNING = "sparse_pruning"
    ROW_PRUNING = "row_pruning"
    HEAD_PRUNING = "head_pruning"
    CHANNEL_PRUNING = "channel_pruning"


@dataclass
class WeightQuantState:
    """Weight quantization of one layer: the MoQ bit schedule and the grid."""

    start_bits: int
    target_bits: int
    period: int
    in_forward: bool
    symmetric: bool
    num_groups: int
    rounding: Rounding
    bits: int  # current bits: start_bits, lowered by the schedule (in-step mode) down to target_bits

    def grid_bits(self) -> int:
        """Bits the forward fake-quantizes to (``target_bits``, as DeepSpeed) or the step quantizes to."""
        return self.target_bits if self.in_forward else self.bits


@dataclass
class MaskState:
    """One pruning mask: how it scores (``l1`` / ``topk`` / ``snip_momentum``) and the density it keeps."""

    method: str
    dense_ratio: float
    block: tuple[int, int] = (1, 1)


class _Compressible:
    """State and techniques shared by every compressed layer. ``weight`` is the layer's parameter."""

    weight: torch.Tensor
    weight_quant: WeightQuantState | None
    act_quant: ActivationQuantizer | None
    masks: dict[Technique, MaskState]
    active: set[Technique]

    def _init_compression(self) -> None:
        self.weight_quant, self.act_quant = None, None
        self.masks, self.active = {}, set()

    # --- weight quantization ----------------------------------------------------------------------------
    def enable_weight_quantization(
        self,
        start_bits: int,
        target_bits: int,
        quantization_period: int,
        in_forward: bool,
        symmetric: bool,
        num_groups: int,
        rounding: Rounding,
    ) -> None:
        """Configure weight quantization (grid, groups, and the ``start_bits -> target_bits`` schedule)."""
        if not symmetric and target_bits < 3:
            raise ValueError(
                f"target_bits={target_bits} (ternary/binary) needs quantization_type 'symmetric'."
            )
        if self.weight.numel() % num_groups:
            raise ValueError(
                f"quantize_groups={num_groups} does not divide the {self.weight.numel()} weights of a "
                f"{tuple(self.weight.shape)} layer; pick a divisor."
            )
        self.weight_quant = WeightQuantState(
            start_bits,
            target_bits,
            quantization_period,
            in_forward,
            symmetric,
            num_groups,
            rounding,
            start_bits,
        )

    def quantize_weight_step(self, qsteps: int, mix_ratio: float = 0.0) -> bool:
        """In-step (MoQ) quantization after an optimizer step: lower the bits when the period is reached,
        then overwrite the weights with their quantized values (blended ``mix_ratio`` with the float ones).
        Returns whether the bits changed."""
        wq = self.weight_quant
        assert wq is not None and not wq.in_forward
        changed = False
        if wq.bits != wq.target_bits and qsteps >= wq.period:
            wq.period <<= 1
            wq.bits -= 1
            changed = True
        with torch.no_grad():
            q = quantize_weight(self.weight, wq.bits, wq.num_groups, wq.symmetric, wq.rounding)
            self.weight.copy_(q if mix_ratio == 0.0 else mix_ratio * self.weight + (1 - mix_ratio) * q)
        return changed

    def fix_weight_quantization(self) -> None:
        """Write the quantized weights into ``weight`` (in-forward mode); the forward stops re-quantizing."""
        wq = self.weight_quant
        if wq is None:
            return
        if wq.in_forward and Technique.WEIGHT_QUANTIZATION in self.active:
            with torch.no_grad():
                self.weight.copy_(quantize_weight(self.weight, wq.target_bits, wq.num_groups, wq.symmetric))
        self.weight_quant = None
        self.active.discard(Technique.WEIGHT_QUANTIZATION)

    # --- activation quantization ------------------------------------------------------------------------
    def enable_activation_quantization(self, bits: int, symmetric: bool, static: bool) -> None:
        """Configure input quantization (``dynamic``: per token; ``static``: EMA range)."""
        self.act_quant = ActivationQuantizer(bits, symmetric, static).to(self.weight.device)

    # --- masks ------------------------------------------------------------------------------------------
    def _register_scores(self, name: str, shape: tuple[int, ...]) -> None:
        scores = torch.empty(shape, device=self.weight.device, dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(scores, a=math.sqrt(5))
        self.register_parameter(name, nn.Parameter(scores))  # type: ignore[attr-defined]

    def enable_sparse_pruning(self, dense_ratio: float, method: str, block: tuple[int, int] = (1, 1)) -> None:
        """Configure unstructured (or ``RxC`` block) pruning of the weight."""
        if method == "topk":
            self._register_scores("sparse_mask_scores", tuple(self.weight.shape))
        if method == "snip_momentum":
            if self.weight.dim() != 2:
                raise ValueError(
                    "snip_momentum prunes [out, in] weights; exclude conv layers (excluded_modules)."
                )
            pruning.block_scores(self.weight.detach(), block)  # validates the pattern against the shape
            self.register_buffer("snip_scores", torch.zeros_like(self.weight))  # type: ignore[attr-defined]
            self.register_buffer("sparse_pruning_mask", torch.ones_like(self.weight))  # type: ignore[attr-defined]
        self.masks[Technique.SPARSE_PRUNING] = MaskState(method, dense_ratio, block)

    def activate(self, technique: Technique) -> None:
        """Start applying ``technique`` (called by the scheduler at its ``schedule_offset``)."""
        if technique in self.active:
            return
        state = self.masks.get(technique)
        if state is not None and state.method == "l1":
            self.register_buffer(_MASK_BUFFER[technique], self._l1_mask(technique, state))  # type: ignore[attr-defined]
        self.active.add(technique)

    def _l1_mask(self, technique: Technique, state: MaskState) -> torch.Tensor:
        w = self.weight.detach()
        if technique is Technique.SPARSE_PRUNING:
            return pruning.topk_mask(w.abs(), state.dense_ratio)
        if technique in (Technique.ROW_PRUNING, Technique.CHANNEL_PRUNING):
            return pruning.topk_mask(pruning.row_l1(w), state.dense_ratio)
        return pruning.topk_mask(pruning.head_l1(w, self.num_heads), state.dense_ratio)  # type: ignore[attr-defined]

    def mask(self, technique: Technique) -> torch.Tensor:
        """The current 0/1 mask of ``technique``: ``[out, in]`` sparse, ``[out]`` row/channel, ``[heads]`` head."""
        state = self.masks[technique]
        if state.method == "topk":
            scores = getattr(self, _SCORES[technique])
            mask = pruning.topk_mask(scores, state.dense_ratio)
            return mask if technique is Technique.SPARSE_PRUNING else mask.flatten()
        if technique not in self.active:
            raise ValueError(
                f"{technique.value} has not started on this layer (its schedule_offset is not reached)."
            )
        return getattr(self, _MASK_BUFFER[technique])  # type: ignore[no-any-return]

    def update_snip_scores(self, momentum: float = 0.9) -> None:
        """Accumulate ``|w * grad|`` (call after backward, before the step); no-op without a gradient."""
        if self.weight.grad is not None:
            s: torch.Tensor = self.snip_scores  # type: ignore[attr-defined]
            s.mul_(momentum).add_((self.weight.detach() * self.weight.grad).abs(), alpha=1 - momentum)

    def update_snip_mask(self, density: float) -> None:
        """Recompute the ``snip_momentum`` mask at ``density`` from the accumulated block scores."""
        state = self.masks[Technique.SPARSE_PRUNING]
        blocks = pruning.block_scores(self.snip_scores, state.block)  # type: ignore[attr-defined]
        self.sparse_pruning_mask.copy_(  # type: ignore[attr-defined]
            pruning.expand_block(pruning.topk_mask(blocks, density), state.block)
        )

    def fix_sparse_pruning(self) -> None:
        """Zero the pruned weights for good and drop the mask (the shape is unchanged)."""
        if Technique.SPARSE_PRUNING in self.active:
            with torch.no_grad():
                self.weight.mul_(self.mask(Technique.SPARSE_PRUNING).detach())
        self._drop(Technique.SPARSE_PRUNING)

    def _drop(self, technique: Technique) -> None:
        self.masks.pop(technique, None)
        self.active.discard(technique)
        names = [_MASK_BUFFER[technique], _SCORES[technique]]
        if technique is Technique.SPARSE_PRUNING:
            names.append("snip_scores")
        for name in names:
            if hasattr(self, name):
                delattr(self, name)

    def _masked(self, technique: Technique) -> bool:
        return technique in self.active and technique in self.masks

    def _quantized_weight(self) -> torch.Tensor:
        wq = self.weight_quant
        if wq is not None and wq.in_forward and Technique.WEIGHT_QUANTIZATION in self.active:
            return fake_quantize_weight(self.weight, wq.target_bits, wq.num_groups, wq.symmetric, wq.rounding)
        return self.weight

    def _quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant is not None and Technique.ACTIVATION_QUANTIZATION in self.active:
            return self.act_quant(x)  # type: ignore[no-any-return]
        return x


_MASK_BUFFER = {
    Technique.SPARSE_PRUNING: "sparse_pruning_mask",
    Technique.ROW_PRUNING: "row_pruning_mask",
    Technique.HEAD_PRUNING: "head_pruning_mask",
    Technique.CHANNEL_PRUNING: "channel_pruning_mask",
}
_SCORES = {
    Technique.SPARSE_PRUNING: "sparse_mask_scores",
    Technique.ROW_PRUNING: "row_mask_scores",
    Technique.HEAD_PRUNING: "head_pruning_scores",
    Technique.CHANNEL_PRUNING: "channel_mask_scores",
}


def _take(param: torch.Tensor, index: torch.Tensor, dim: int) -> nn.Parameter:
    return nn.Parameter(param.detach().index_select(dim, index).clone(), requires_grad=param.requires_grad)


class CompressedLinear(_Compressible, nn.Linear):
    """``nn.Linear`` with weight/activation quantization and sparse, row and head pruning."""

    num_heads: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_compression()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> CompressedLinear:
        """A compressed layer sharing ``linear``'s parameters (no copy)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        return new

    def enable_row_pruning(self, dense_ratio: float, method: str) -> None:
        """Configure pruning of output rows (and their bias entries)."""
        if method == "topk":
            self._register_scores("row_mask_scores", (self.out_features, 1))  # DeepSpeed's shapes
        self.masks[Technique.ROW_PRUNING] = MaskState(method, dense_ratio)

    def enable_head_pruning(self, dense_ratio: float, method: str, num_heads: int) -> None:
        """Configure head pruning on this output projection: ``in_features`` is ``num_heads * head_dim``."""
        if self.in_features % num_heads:
            raise ValueError(
                f"num_heads={num_heads} does not divide in_features={self.in_features} of a head-pruned "
                "layer; head pruning applies to the attention output projection."
            )
        self.num_heads = num_heads
        if method == "topk":
            self._register_scores("head_pruning_scores", (1, num_heads))
        self.masks[Technique.HEAD_PRUNING] = MaskState(method, dense_ratio)

    def compressed_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias the forward uses: quantized and masked as configured and active."""
        weight: torch.Tensor = self._quantized_weight()
        bias: torch.Tensor | None = self.bias
        if self._masked(Technique.SPARSE_PRUNING):
            weight = weight * self.mask(Technique.SPARSE_PRUNING)
        if self._masked(Technique.ROW_PRUNING):
            m = self.mask(Technique.ROW_PRUNING)
            weight = weight * m[:, None]
            bias = None if bias is None else bias * m
        if self._masked(Technique.HEAD_PRUNING):
            m = self.mask(Technique.HEAD_PRUNING).repeat_interleave(self.in_features // self.num_heads)
            weight = weight * m[None, :]
        return weight, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.compressed_weight()
        return F.linear(self._quantized_input(x), weight, bias)

    # --- physical removal -------------------------------------------------------------------------------
    def fix_row_pruning(self, dim_reduction: bool) -> torch.Tensor | None:
        """Bake the row mask: cut the pruned rows out (``dim_reduction``) or zero them. Returns the kept mask."""
        if Technique.ROW_PRUNING not in self.masks:
            return None
        keep = self.mask(Technique.ROW_PRUNING).detach().bool()
        if dim_reduction:
            self.keep_outputs(keep)
        else:
            with torch.no_grad():
                self.weight.mul_(keep[:, None])
                if self.bias is not None:
                    self.bias.mul_(keep)
        self._drop(Technique.ROW_PRUNING)
        return keep

    def fix_head_pruning(self, dim_reduction: bool) -> torch.Tensor | None:
        """Bake the head mask: cut the pruned heads' input columns out or zero them. Returns the kept mask."""
        if Technique.HEAD_PRUNING not in self.masks:
            return None
        keep = self.mask(Technique.HEAD_PRUNING).detach().bool()
        cols = keep.repeat_interleave(self.in_features // self.num_heads)
        if dim_reduction:
            self.keep_inputs(cols)
        else:
            with torch.no_grad():
                self.weight.mul_(cols[None, :])
        self._drop(Technique.HEAD_PRUNING)
        return keep

    def keep_outputs(self, keep: torch.Tensor) -> None:
        """Keep only the output rows where ``keep`` (bool ``[out]``) is true."""
        index = keep.nonzero().flatten()
        self.weight = _take(self.weight, index, 0)
        if self.bias is not None:
            self.bias = _take(self.bias, index, 0)
        self.out_features = int(index.numel())

    def keep_inputs(self, keep: torch.Tensor) -> None:
        """Keep only the input columns where ``keep`` (bool ``[in]``) is true."""
        index = keep.nonzero().flatten()
        self.weight = _take(self.weight, index, 1)
        self.in_features = int(index.numel())

    def extra_repr(self) -> str:
        techniques = ", ".join(sorted(t.value for t in {*self.masks, *self.active}))
        return f"{super().extra_repr()}, compression=[{techniques}]"


class CompressedConv2d(_Compressible, nn.Conv2d):
    """``nn.Conv2d`` with weight/activation quantization, sparse and output-channel pruning."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_compression()

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> CompressedConv2d:
        """A compressed layer sharing ``conv``'s parameters (no copy)."""
        new = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,  # type: ignore[arg-type]
            conv.stride,  # type: ignore[arg-type]
            conv.padding,  # type: ignore[arg-type]
            conv.dilation,  # type: ignore[arg-type]
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            device="meta",
        )
        new.weight, new.bias = conv.weight, conv.bias
        return new

    def enable_channel_pruning(self, dense_ratio: float, method: str) -> None:
        """Configure pruning of output channels (and their bias entries)."""
        if method == "topk":
            self._register_scores("channel_mask_scores", (self.out_channels, 1, 1, 1))
        self.masks[Technique.CHANNEL_PRUNING] = MaskState(method, dense_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self._quantized_weight(), self.bias
        if self._masked(Technique.SPARSE_PRUNING):
            weight = weight * self.mask(Technique.SPARSE_PRUNING)
        if self._masked(Technique.CHANNEL_PRUNING):
            m = self.mask(Technique.CHANNEL_PRUNING)
            weight = weight * m[:, None, None, None]
            bias = None if bias is None else bias * m
        return self._conv_forward(self._quantized_input(x), weight, bias)

    def fix_channel_pruning(self, dim_reduction: bool) -> torch.Tensor | None:
        """Bake the channel mask: cut pruned output channels out or zero them. Returns the kept mask."""
        if Technique.CHANNEL_PRUNING not in self.masks:
            return None
        keep = self.mask(Technique.CHANNEL_PRUNING).detach().bool()
        if dim_reduction:
            self.keep_outputs(keep)
        else:
            with torch.no_grad():
                self.weight.mul_(keep[:, None, None, None])
                if self.bias is not None:
                    self.bias.mul_(keep)
        self._drop(Technique.CHANNEL_PRUNING)
        return keep

    def keep_outputs(self, keep: torch.Tensor) -> None:
        """Keep only the output channels where ``keep`` (bool ``[out]``) is true."""
        if self.groups != 1:
            raise ValueError(f"channel pruning of a grouped conv (groups={self.groups}) is not implemented.")
        index = keep.nonzero().flatten()
        self.weight = _take(self.weight, index, 0)
        if self.bias is not None:
            self.bias = _take(self.bias, index, 0)
        self.out_channels = int(index.numel())

    def keep_inputs(self, keep: torch.Tensor) -> None:
        """Keep only the input channels where ``keep`` (bool ``[in]``) is true."""
        if self.groups != 1:
            raise ValueError(
                f"channel pruning into a grouped conv (groups={self.groups}) is not implemented."
            )
        index = keep.nonzero().flatten()
        self.weight = _take(self.weight, index, 1)
        self.in_channels = int(index.numel())


class CompressedEmbedding(_Compressible, nn.Embedding):
    """``nn.Embedding`` with weight quantization (one group per token row, as DeepSpeed)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._init_compression()

    @classmethod
    def from_embedding(cls, emb: nn.Embedding) -> CompressedEmbedding:
        """A compressed embedding sharing ``emb``'s weight (no copy)."""
        new = cls(
            emb.num_embeddings,
            emb.embedding_dim,
            emb.padding_idx,
            emb.max_norm,
            emb.norm_type,
            emb.scale_grad_by_freq,
            emb.sparse,
            device="meta",
        )
        new.weight = emb.weight
        return new

    def enable_weight_quantization(
        self,
        start_bits: int,
        target_bits: int,
        quantization_period: int,
        in_forward: bool,
        symmetric: bool,
        num_groups: int,
        rounding: Rounding,
    ) -> None:
        """As for linear layers, but grouped per token row (DeepSpeed ignores ``quantize_groups`` here)."""
        super().enable_weight_quantization(
            start_bits, target_bits, quantization_period, in_forward, symmetric, self.num_embeddings, rounding
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(
            x,
            self._quantized_weight(),
            self.padding_idx,
            self.max_norm,
            self.norm_type,
            self.scale_grad_by_freq,
            self.sparse,
        )


def keep_batchnorm_channels(bn: nn.BatchNorm2d, keep: torch.Tensor) -> None:
    """Shrink ``bn`` to the channels where ``keep`` is true (after the conv before it lost channels)."""
    index = keep.nonzero().flatten()
    if bn.affine:
        bn.weight = _take(bn.weight, index, 0)
        bn.bias = _take(bn.bias, index, 0)
    if bn.running_mean is not None and bn.running_var is not None:
        bn.running_mean = bn.running_mean.index_select(0, index).clone()
        bn.running_var = bn.running_var.index_select(0, index).clone()
    bn.num_features = int(index.numel())
