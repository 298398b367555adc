"""Inference: :func:`init_inference` (DeepSpeed's API), fused decoder layers over a preallocated KV cache,
and weight-only int8/int4 quantization. See docs/inference.md.
"""

from deepshard.inference.config import InferenceConfig, load_inference_config
from deepshard.inference.engine import InferenceEngine, init_inference
from deepshard.inference.kv_cache import KVCache, StepBatch
from deepshard.inference.model import FusedCausalLM
from deepshard.inference.policies import POLICIES, inject
from deepshard.inference.quant import QuantizedLinear, quantize_linears

__all__ = [
    "POLICIES",
    "FusedCausalLM",
    "InferenceConfig",
    "InferenceEngine",
    "KVCache",
    "QuantizedLinear",
    "StepBatch",
    "init_inference",
    "inject",
    "load_inference_config",
    "quantize_linears",
]
