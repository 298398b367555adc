"""``init_inference`` and :class:`InferenceEngine`: the model converted, optionally fused and quantized.

The engine applies, in this order: dtype conversion, device placement, automatic tensor parallelism
(``tensor_parallel.tp_size > 1``), kernel injection
(``replace_with_kernel_inject``), weight-only quantization (``quant.weight.post_init_quant``, applied to
the fused model when injected, else to the model). Called like the model; ``generate`` is greedy
decoding over a preallocated KV cache when injected, Hugging Face's ``generate`` otherwise.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from deepshard.accelerator import get_accelerator
from deepshard.inference.autotp import auto_tp
from deepshard.inference.config import InferenceConfig, load_inference_config, torch_dtype
from deepshard.inference.generate import compact_prompts, greedy_generate, plan_greedy
from deepshard.inference.model import FusedCausalLM
from deepshard.inference.policies import inject
from deepshard.inference.quant import quantize_linears

logger = logging.getLogger(__name__)


class InferenceEngine(nn.Module):
    """The served model. ``module`` is the (converted) user model; ``fused`` its injected form, if any."""

    def __init__(self, model: nn.Module, config: InferenceConfig) -> None:
        super().__init__()
        self._config = config
        model.eval()
        model.to(torch_dtype(config.dtype))
        if not config.keep_module_on_host:
            model.to(get_accelerator().device())
        tp = config.tensor_parallel
        if tp.enabled and tp.tp_size > 1:
            names = auto_tp(model, tp.tp_size, tp.tp_grain_size)
            logger.info("automatic tensor parallelism over %d ranks: %d modules split", tp.tp_size, len(names))
        self.module = model
        self.fused: FusedCausalLM | None = inject(model) if config.replace_with_kernel_inject else None
        rules = config.quant.weight.post_init_quant
        if rules and config.quant.enabled and config.quant.weight.enabled:
            target = self.fused if self.fused is not None else model
            names = quantize_linears(target, rules)
            logger.info("weight-only quantization: %d linear layers", len(names))

    @property
    def config(self) -> InferenceConfig:
        """The validated configuration."""
        return self._config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model. Injected: ``(input_ids, attention_mask=None)`` -> an output with ``logits`` ``[B, T, V]``.

        With a padding mask, logits at padded positions are zero (Hugging Face computes values there
        that no loss or generation reads).
        """
        if self.fused is None:
            return self.module(*args, **kwargs)
        return self._fused_forward(*args, **kwargs)

    @torch.inference_mode()
    def _fused_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        unknown = sorted(k for k, v in kwargs.items() if not (k in ("use_cache", "return_dict") and v is not False))
        if unknown:
            raise ValueError(
                f"the kernel-injected model takes input_ids and attention_mask; got {unknown}, which it does not "
                "implement. Use replace_with_kernel_inject=False for the model's full forward."
            )
        assert self.fused is not None
        tokens, valid = compact_prompts(input_ids, attention_mask)
        if tokens.shape[1] > self._config.max_out_tokens:
            raise ValueError(
                f"input of {tokens.shape[1]} tokens exceeds max_out_tokens={self._config.max_out_tokens}; raise it in "
                "the init_inference config."
            )
        cache = self.fused.new_cache(tokens.shape[0], tokens.shape[1])
        batch = cache.step(torch.arange(tokens.shape[0]), tokens.shape[1], valid)
        logits = self.fused(tokens, cache, batch, all_logits=True)
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            full = logits.new_zeros(*input_ids.shape, logits.shape[-1])
            keep = torch.arange(tokens.shape[1], device=logits.device)[None, :] < valid.to(logits.device)[:, None]
            full[attention_mask.bool()] = logits[keep]
            logits = full
        return CausalLMOutputWithPast(logits=logits)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Generate continuations of ``input_ids`` ``[B, T]``; see :mod:`deepshard.inference.generate`."""
        if self.fused is None:
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask
            return self.module.generate(input_ids, **kwargs)  # type: ignore[operator]
        plan = plan_greedy(getattr(self.module, "generation_config", None), input_ids.shape[1], kwargs)
        return greedy_generate(
            self.fused, input_ids, attention_mask, plan,
            max_out_tokens=self._config.max_out_tokens, min_out_tokens=self._config.min_out_tokens,
        )


def init_inference(
    model: nn.Module, config: InferenceConfig | Mapping[str, Any] | str | None = None, **kwargs: Any
) -> InferenceEngine:
    """Wrap ``model`` for inference with DeepSpeed's ``init_inference`` arguments.

    ``config`` is a dict (or JSON path) of ``DeepSpeedInferenceConfig`` keys; keyword arguments are merged
    over it (a key in both with different values is an error). Example::

        engine = deepshard.init_inference(model, dtype=torch.float32, replace_with_kernel_inject=True)
        out = engine.generate(input_ids, max_new_tokens=32)

    Raises:
        ConfigError: for an unknown or invalid key (the message names its dotted path).
        NotSupportedYetError: for a DeepSpeed option deepshard does not implement.
        ValueError: when kernel injection has no fused implementation for the model.
    """
    return InferenceEngine(model, load_inference_config(config, **kwargs))
