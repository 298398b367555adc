"""Top-level DeepSpeed keys that deepshard recognises but does not implement yet.

Each is refused with :class:`~deepshard.config.NotSupportedYetError` unless its value asks for
nothing (the rule shown in ``accepted``), so that no DeepSpeed feature is ever silently ignored.
The list follows DeepSpeed's ``DeepSpeedConfig._initialize_params`` and its documented sections.
"""

from __future__ import annotations

from deepshard.config._types import (
    Unsupported,
    all_defaults,
    empty,
    equals,
    refused,
    switched_off,
    unsupported,
)

_ACTIVATION_CHECKPOINTING_DEFAULTS = {
    "partition_activations": False,
    "contiguous_memory_optimization": False,
    "cpu_checkpointing": False,
    "number_checkpoints": None,
    "synchronize_checkpoint_boundary": False,
    "profile": False,
}

TOP_LEVEL_NOT_SUPPORTED: dict[str, Unsupported] = {
    "activation_checkpointing": unsupported(
        "activation checkpointing options", all_defaults(_ACTIVATION_CHECKPOINTING_DEFAULTS)
    ),
    "amp": unsupported("NVIDIA Apex AMP mixed precision", switched_off()),
    "compile": unsupported("DeepCompile compiler passes", empty()),
    "curriculum_learning": unsupported("legacy curriculum learning", switched_off()),
    "data_efficiency": unsupported(
        "data sampling and routing (curriculum learning, random-LTD)", switched_off()
    ),
    "datastates_ckpt": unsupported(
        "DataStates asynchronous checkpointing (enabled whenever present)", refused()
    ),
    "disable_allgather": unsupported("disables the parameter all-gather", equals(False)),
    "disable_python_gc": unsupported("disables Python's cyclic garbage collector", equals(False)),
    "dump_state": unsupported("prints the engine state after initialisation", equals(False)),
    "eigenvalue": unsupported("eigenvalue computation for quantisation", switched_off()),
    "elasticity": unsupported("elastic training (batch size chosen from the GPU count)", switched_off()),
    "expert_parallel": unsupported("AutoEP expert parallelism for MoE models", switched_off()),
    "gradient_allreduce_op": unsupported("averaging (`mean`) or summing (`sum`) gradients", equals("mean")),
    "graph_harvesting": unsupported("CUDA graph capture of short kernel sequences", equals(False)),
    "hybrid_engine": unsupported("the RLHF hybrid training/inference engine", switched_off()),
    "log_level": unsupported("DeepSpeed's log level", equals(None)),
    "managed_gradient_accumulation": unsupported(
        "who owns the gradient accumulation boundary (`false`: the client)", equals(True)
    ),
    "nebula": unsupported("Nebula checkpointing service", switched_off()),
    "pipeline": unsupported("pipeline-parallel engine options", empty()),
    "progressive_layer_drop": unsupported("progressive layer dropping", switched_off()),
    "quantize_training": unsupported("MoQ quantisation-aware training", switched_off()),
    "seq_parallel_communication_data_type": unsupported(
        "gradient communication dtype for sequence parallelism", equals("fp32")
    ),
    "sequence_parallel_size": unsupported("Ulysses sequence parallelism degree", equals(1)),
    "sparse_attention": unsupported("block-sparse attention kernels", empty()),
    "sparse_gradients": unsupported("CSR sparse gradients for embeddings", equals(False)),
    "tensor_parallel": unsupported("AutoTP tensor parallelism", all_defaults({"autotp_size": 0})),
    "timers": unsupported("throughput timers", empty()),
    "torch_autocast": unsupported("torch.autocast mixed precision", switched_off()),
    "use_data_before_expert_parallelism": unsupported("data/expert parallel group ordering", equals(False)),
    "vocabulary_size": unsupported("a hint used only for a tensor-core alignment warning", equals(None)),
    "weight_quantization": unsupported("weight quantisation for inference", empty()),
}
