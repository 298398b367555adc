"""When each technique starts, and the per-step work of in-step weight quantization and snip_momentum.

Call :meth:`CompressionScheduler.step` once after every optimizer step (DeepSpeed's engine does so for
its ``compression_scheduler``). Construction counts as step 0: techniques with ``schedule_offset`` 0 are
active from the first forward. At step ``s`` a technique is active when ``s >= schedule_offset``.
Weight quantization with ``quantize_weight_in_forward: false`` (MoQ) rewrites the stored weights after
each step from ``start_bits``, losing one bit each time the step count since the offset reaches the
period, and doubling the period after each drop, until ``target_bits``. ``snip_momentum`` accumulates
``|w * grad|`` every step and, every ``schedule_offset_stride`` steps in ``[schedule_offset,
schedule_offset_end]``, re-masks on a cubic ramp of density from 1 to ``dense_ratio``.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from deepshard.compression.layers import Technique, _Compressible
from deepshard.compression.patterns import COMPRESSIBLE, plan
from deepshard.compression.pruning import cubic_density
from deepshard.config._compression import load_compression_config

logger = logging.getLogger(__name__)


class CompressionScheduler:
    """Turns techniques on at their offsets and runs their per-step updates on a model from ``init_compression``."""

    def __init__(self, model: nn.Module, deepspeed_config: Any) -> None:
        self.config = load_compression_config(deepspeed_config)
        module = getattr(model, "module", None)
        self.model = module if isinstance(module, nn.Module) else model
        self.modules: dict[Technique, list[_Compressible]] = {}
        for gp in plan(self.model, self.config):
            found = [(n, self.model.get_submodule(n)) for names in gp.modules for n in names]
            plain = [n for n, m in found if isinstance(m, COMPRESSIBLE[:3]) and not isinstance(m, _Compressible)]
            if plain:
                raise ValueError(f"{plain[0]} is a plain {type(self.model.get_submodule(plain[0])).__name__}: call "
                                 "init_compression(model, config) before building the compression scheduler.")
            self.modules.setdefault(gp.technique, []).extend(m for _, m in found if isinstance(m, _Compressible))
        self.training_steps = 0
        self.quant_steps = 0
        wq = self.config.weight_quantization.shared_parameters.fp16_mixed_quantize
        self.mix_ratio = 1.0 if wq.enabled else 0.0
        self._activate()

    def offset(self, technique: Technique) -> int:
        """``schedule_offset`` of ``technique``."""
        return int(getattr(self.config, technique.value).shared_parameters.schedule_offset)

    def is_active(self, technique: Technique) -> bool:
        """Whether ``technique`` is enabled and its offset reached."""
        return technique in self.modules and self.training_steps >= self.offset(technique)

    def step(self) -> None:
        """Advance one training step (call after ``optimizer.step()``)."""
        self.training_steps += 1
        self._activate()
        self._moq()
        self._snip()

    def _activate(self) -> None:
        for technique, modules in self.modules.items():
            if not self.is_active(technique):
                continue
            for m in modules:
                if technique not in m.active:
                    m.activate(technique)

    def _moq(self) -> None:
        shared = self.config.weight_quantization.shared_parameters
        if shared.quantize_weight_in_forward or not self.is_active(Technique.WEIGHT_QUANTIZATION):
            return
        self.quant_steps += 1
        if self.mix_ratio > 0.0:
            self.mix_ratio = max(0.0, self.mix_ratio - shared.fp16_mixed_quantize.quantize_change_ratio)
        for m in self.modules[Technique.WEIGHT_QUANTIZATION]:
            if m.quantize_weight_step(self.quant_steps, self.mix_ratio) and shared.quantize_verbose:
                assert m.weight_quant is not None
                logger.info(
                    "weight quantization: %d bits at step %d", m.weight_quant.bits, self.training_steps
                )

    def _snip(self) -> None:
        shared = self.config.sparse_pruning.shared_parameters
        if shared.method != "snip_momentum" or not self.is_active(Technique.SPARSE_PRUNING):
            return
        since = self.training_steps - shared.schedule_offset
        for m in self.modules[Technique.SPARSE_PRUNING]:
            if Technique.SPARSE_PRUNING not in m.masks:
                continue  # excluded_modules
            m.update_snip_scores()
            if self.training_steps <= shared.end and (
                since % shared.schedule_offset_stride == 0 or self.training_steps == shared.end
            ):
                m.update_snip_mask(
                    cubic_density(self.training_steps, shared.schedule_offset, shared.end, shared.dense_ratio)
                )


compression_scheduler = CompressionScheduler
"""DeepSpeed's name for :class:`CompressionScheduler`."""
