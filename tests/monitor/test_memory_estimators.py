"""DeepSpeed's model-state estimators: numbers equal its formulas (worked out by hand here)."""

from __future__ import annotations

import pytest
from torch import nn

from deepshard.profiling.memory_estimators import (
    estimate_zero2_model_states_mem_needs,
    estimate_zero2_model_states_mem_needs_all_cold,
    estimate_zero2_model_states_mem_needs_all_live,
    estimate_zero3_model_states_mem_needs,
    estimate_zero3_model_states_mem_needs_all_cold,
    estimate_zero3_model_states_mem_needs_all_live,
    model_to_params_and_largest_layer,
)

P, L = 10**9, 10**8  # total and largest-layer parameters; 8 GPUs on 1 node


def test_zero2_formulas() -> None:
    assert estimate_zero2_model_states_mem_needs(P, 8, 1, cpu_offload=True) == (
        48 * P,
        2 * P,
    )  # max(4*8,16)*1.5
    assert estimate_zero2_model_states_mem_needs(P, 8, 1, cpu_offload=False) == (48 * P, 2 * P + 18 * P // 8)
    assert estimate_zero2_model_states_mem_needs(P, 1, 1, cpu_offload=True) == (
        24 * P,
        2 * P,
    )  # max(4, 16)*1.5


@pytest.mark.parametrize(
    ("offload", "offload_params", "zero_init", "cpu", "gpu"),
    [
        (True, True, True, 27 * P, 4 * L),  # 18 * 1.5
        (True, True, False, 48 * P, 4 * L),  # max(4*8, 18) * 1.5
        (True, False, True, 24 * P, 4 * L + 2 * P // 8),  # 16 * 1.5
        (True, False, False, 48 * P, 4 * L + 2 * P // 8),
        (False, False, True, 48 * L, 4 * L + 18 * P // 8),  # largest layer * 4 * 8 * 1.5
        (False, False, False, 48 * P, 4 * L + 18 * P // 8),
    ],
)
def test_zero3_formulas(offload, offload_params, zero_init, cpu, gpu) -> None:
    got = estimate_zero3_model_states_mem_needs(P, L, 8, 1, offload, offload_params, zero_init)
    assert got == (cpu, gpu, 4 * L)


def test_two_nodes_divide_host_memory() -> None:
    cpu, _, _ = estimate_zero3_model_states_mem_needs(P, L, 4, 2, True, True, True)
    assert cpu == int(P * 18 / 2 * 1.5)


def test_tables_and_live_counts() -> None:
    model = nn.Sequential(nn.Linear(100, 200), nn.ReLU(), nn.Linear(200, 10))
    model.add_module("tied", nn.Linear(100, 200))
    model.tied.weight = model[0].weight  # shared: counted once
    total, largest = model_to_params_and_largest_layer(model)
    assert total == 100 * 200 + 200 + 200 * 10 + 10 + 200 and largest == 100 * 200 + 200
    rows = estimate_zero2_model_states_mem_needs_all_live(model, num_gpus_per_node=2)
    assert [r.options for r in rows] == ["offload_optimizer=cpu ", "offload_optimizer=none"]
    assert rows == estimate_zero2_model_states_mem_needs_all_cold(total, num_gpus_per_node=2)
    rows3 = estimate_zero3_model_states_mem_needs_all_live(model)
    assert len(rows3) == 6 and rows3[0].options == "offload_param=cpu , offload_optimizer=cpu , zero_init=1"
    assert rows3 == estimate_zero3_model_states_mem_needs_all_cold(total, largest)
    # 1 GPU, no offload, no zero_init: host 4 * 1.5 * P = 5.59 GiB, device 4 L + 18 P = 17.14 GiB
    last = estimate_zero3_model_states_mem_needs_all_cold(P, L)[-1]
    assert last.line() == "    5.59GB |  17.14GB | offload_param=none, offload_optimizer=none, zero_init=0"


def test_deepspeed_import_paths() -> None:
    from deepshard.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_live as live3
    from deepshard.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold as cold2

    assert live3 is estimate_zero3_model_states_mem_needs_all_live
    assert cold2 is estimate_zero2_model_states_mem_needs_all_cold


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_gpus_per_node and num_nodes must be at least 1"):
        estimate_zero2_model_states_mem_needs(P, 0)
