"""DeepSpeed's ZeRO-2 and ZeRO-3 model-state memory estimators, with its names, arguments and numbers.

These count model states only (parameters, gradients, optimizer state), with DeepSpeed's byte
multipliers for mixed-precision Adam and its ``additional_buffer_factor`` on host memory; activations
are not included (see :mod:`deepshard.profiling.peak_memory` for the whole peak). The ``*_all_live`` /
``*_all_cold`` functions log DeepSpeed's table on rank 0 (DeepSpeed prints it) and also return its rows.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from deepshard.utils.logging import log_dist

GiB = 2**30


@dataclass(frozen=True)
class EstimateRow:
    """One line of the table: bytes per CPU (host) and per GPU (device) for ``options``."""

    cpu_bytes: int
    gpu_bytes: int
    options: str

    def line(self) -> str:
        """`` 12.34GB |   5.67GB | offload_optimizer=cpu `` as DeepSpeed prints it."""
        return f" {self.cpu_bytes / GiB:7.2f}GB | {self.gpu_bytes / GiB:6.2f}GB | {self.options}"


def _check(num_gpus_per_node: int, num_nodes: int, additional_buffer_factor: float) -> None:
    if num_gpus_per_node < 1 or num_nodes < 1:
        raise ValueError(
            f"num_gpus_per_node and num_nodes must be at least 1, got {num_gpus_per_node} and {num_nodes}"
        )
    if additional_buffer_factor <= 0:
        raise ValueError(f"additional_buffer_factor must be positive, got {additional_buffer_factor}")


# ------------------------------------------------------------------ ZeRO-2
def estimate_zero2_model_states_mem_needs(
    total_params: int,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    cpu_offload: bool = True,
    additional_buffer_factor: float = 1.5,
) -> tuple[int, int]:
    """``(cpu_bytes, gpu_bytes)`` per device for ZeRO-2 (DeepSpeed's formula).

    GPU: 16-bit parameters (2Ψ) plus, without offload, this rank's share of 16-bit and 32-bit
    gradients, 32-bit master weights and Adam's two moments (18Ψ/N). CPU: with optimizer offload
    ``Ψ·max(4N, 16)``, else ``4Ψ`` per GPU of the node, each times ``additional_buffer_factor``.
    """
    _check(num_gpus_per_node, num_nodes, additional_buffer_factor)
    total_gpus = num_nodes * num_gpus_per_node
    if cpu_offload:
        gpu_mem = 2 * total_params
        cpu_mem = total_params * max(4 * total_gpus, 16) * additional_buffer_factor
    else:
        gpu_mem = 2 * total_params + int(18 * total_params / total_gpus)
        cpu_mem = total_params * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem)


def model_to_params(model: nn.Module) -> int:
    """Parameters of ``model``, a tensor shared by several modules counted once."""
    return sum({p.data_ptr(): p.numel() for p in model.parameters()}.values())


def _header(num_nodes: int, num_gpus_per_node: int, what: str) -> str:
    nodes = "nodes" if num_nodes > 1 else "node"
    gpus = "GPUs" if num_gpus_per_node > 1 else "GPU"
    return (
        "Estimated memory needed for params, optim states and gradients for a:\n"
        f"HW: Setup with {num_nodes} {nodes}, {num_gpus_per_node} {gpus} per node.\n"
        f"SW: Model with {what}.\n  per CPU  |  per GPU |   Options"
    )


def estimate_zero2_model_states_mem_needs_all_cold(
    total_params: int, num_gpus_per_node: int = 1, num_nodes: int = 1, additional_buffer_factor: float = 1.5
) -> list[EstimateRow]:
    """Log (rank 0) and return DeepSpeed's ZeRO-2 table for a model of ``total_params`` parameters."""
    rows = []
    for cpu_offload in (True, False):
        cpu, gpu = estimate_zero2_model_states_mem_needs(
            total_params, num_gpus_per_node, num_nodes, cpu_offload, additional_buffer_factor
        )
        rows.append(EstimateRow(cpu, gpu, f"offload_optimizer={'cpu ' if cpu_offload else 'none'}"))
    head = _header(num_nodes, num_gpus_per_node, f"{int(total_params / 1e6)}M total params")
    log_dist("\n".join([head, *(r.line() for r in rows)]), ranks=[0])
    return rows


def estimate_zero2_model_states_mem_needs_all_live(
    model: nn.Module, num_gpus_per_node: int = 1, num_nodes: int = 1, additional_buffer_factor: float = 1.5
) -> list[EstimateRow]:
    """:func:`estimate_zero2_model_states_mem_needs_all_cold` with the parameters counted from ``model``."""
    return estimate_zero2_model_states_mem_needs_all_cold(
        model_to_params(model), num_gpus_per_node, num_nodes, additional_buffer_factor
    )


# ------------------------------------------------------------------ ZeRO-3
def estimate_zero3_model_states_mem_needs(
    total_params: int,
    largest_layer_params: int,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    cpu_offload: bool = True,
    cpu_offload_params: bool = True,
    zero_init: bool = True,
    additional_buffer_factor: float = 1.5,
) -> tuple[int, int, int]:
    """``(cpu_bytes, gpu_bytes, largest_layer_bytes)`` per device for ZeRO-3 (DeepSpeed's formula).

    The GPU always holds the largest layer gathered (4 bytes per parameter: 16-bit weights and
    gradients); without parameter offload also 2Ψ/N of 16-bit shards, without optimizer offload
    18Ψ/N. Host memory follows DeepSpeed's rules for ``zero_init`` (model built already sharded).
    """
    _check(num_gpus_per_node, num_nodes, additional_buffer_factor)
    total_gpus = num_nodes * num_gpus_per_node
    gpus_factor = 1 / num_nodes
    largest_layer_memory = 4 * largest_layer_params
    if cpu_offload:
        if cpu_offload_params:
            gpu_mem = largest_layer_memory
            per_param = 18 * gpus_factor if zero_init else max(4 * num_gpus_per_node, 18 * gpus_factor)
        else:
            gpu_mem = largest_layer_memory + int(2 * total_params / total_gpus)
            per_param = 16 * gpus_factor if zero_init else max(4 * num_gpus_per_node, 16 * gpus_factor)
        cpu_mem = total_params * per_param * additional_buffer_factor
    else:
        gpu_mem = largest_layer_memory + int(18 * total_params / total_gpus)
        counted = largest_layer_params if zero_init else total_params
        cpu_mem = counted * 4 * num_gpus_per_node * additional_buffer_factor
    return int(cpu_mem), int(gpu_mem), largest_layer_memory


def model_to_params_and_largest_layer(model: nn.Module) -> tuple[int, int]:
    """``(total parameters, parameters of the module with most direct parameters)`` (DeepSpeed's ``model_to_params``)."""
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules()), default=0)
    return model_to_params(model), largest


def estimate_zero3_model_states_mem_needs_all_cold(
    total_params: int,
    largest_layer_params: int,
    num_gpus_per_node: int = 1,
    num_nodes: int = 1,
    additional_buffer_factor: float = 1.5,
) -> list[EstimateRow]:
    """Log (rank 0) and return DeepSpeed's ZeRO-3 table: offload of optimizer/params, ``zero_init`` on/off."""
    rows = []
    for cpu_offload in (True, False):
        for cpu_offload_params in (True, False):
            if not cpu_offload and cpu_offload_params:
                continue
            for zero_init in (True, False):
                cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
                    total_params, largest_layer_params, num_gpus_per_node, num_nodes,
                    cpu_offload, cpu_offload_params, zero_init, additional_buffer_factor,
                )  # fmt: skip
                options = (
                    f"offload_param={'cpu ' if cpu_offload_params else 'none'}, "
                    f"offload_optimizer={'cpu ' if cpu_offload else 'none'}, zero_init={int(zero_init)}"
                )
                rows.append(EstimateRow(cpu, gpu, options))
    what = f"{int(total_params / 1e6)}M total params, {int(largest_layer_params / 1e6)}M largest layer params"
    log_dist("\n".join([_header(num_nodes, num_gpus_per_node, what), *(r.line() for r in rows)]), ranks=[0])
    return rows


def estimate_zero3_model_states_mem_needs_all_live(
    model: nn.Module, num_gpus_per_node: int = 1, num_nodes: int = 1, additional_buffer_factor: float = 1.5
) -> list[EstimateRow]:
    """:func:`estimate_zero3_model_states_mem_needs_all_cold` with the counts taken from ``model``."""
    total, largest = model_to_params_and_largest_layer(model)
    return estimate_zero3_model_states_mem_needs_all_cold(
        total, largest, num_gpus_per_node, num_nodes, additional_buffer_factor
    )
