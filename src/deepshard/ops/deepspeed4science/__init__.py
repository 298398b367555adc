"""DeepSpeed4Science kernels: ``DS4Sci_EvoformerAttention`` (memory-efficient Evoformer attention)."""

from deepshard.ops.deepspeed4science.evoformer_attn import DS4Sci_EvoformerAttention, EvoformerFusedAttention

__all__ = ["DS4Sci_EvoformerAttention", "EvoformerFusedAttention"]
