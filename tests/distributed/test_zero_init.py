"""zero.Init: models built partitioned have the values of a normal construction, in a fraction of the memory."""

from __future__ import annotations

import math

import pytest
import torch
import zero_init_runs as zr
from engine_runs import LOSS_TOL, STEPS, reference

from deepshard.testing.models import GPT, PRESETS
from deepshard.testing.parity import max_relative_difference, max_state_difference
from deepshard.zero.init import Init
from deepshard.zero.rows import LOCAL_ROWS


def test_values_equal_normal_construction_and_training_matches(dist2):
    results = dist2.run(zr.built_values_and_training)
    ref = reference(2, 1, preset="odd")
    for r in results:
        # the tied embedding, every matrix and the 240-wide fc biases; norms and 60-wide biases stay whole
        assert "tok.weight" in r["partitioned"] and "blocks.0.fc.bias" in r["partitioned"]
        assert "blocks.0.ln1.weight" not in r["partitioned"]
        assert r["keys"] and r["differ"] == [], (
            f"initial values differ from a normal construction: {r['differ']}"
        )
        assert len(r["losses"]) == STEPS
        assert max_relative_difference(r["losses"], ref.losses) <= LOSS_TOL
        assert max_state_difference(r["state"], ref.state) <= ref.bound.state
    assert max_state_difference(results[0]["state"], results[1]["state"]) == 0.0


@pytest.mark.parametrize("half", [False, True])
def test_parent_reinitialisation_is_exact(half, dist2, dist4):
    # trunc_normal_ (both samplers), xavier/kaiming/orthogonal/sparse/dirac/eye, elementwise updates with
    # full-size operands, indexed writes to a whole parameter, Module.half() inside the context
    for harness in (dist2, dist4):
        for rank, bad in enumerate(harness.run(zr.zoo_rows, half)):
            assert bad == [], f"world {harness.world_size} rank {rank}: {bad}"


def test_construction_memory_is_a_fraction_of_the_model(dist4):
    results = dist4.run(zr.construction_memory)
    for rank, r in enumerate(results):
        losses = r.pop("losses")
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
        mib = {k: round(v / 2**20, 1) for k, v in r.items()}
        message = f"rank {rank}: full fp32 model {mib['full']} MiB, peak RSS increase {mib['peak']} MiB, held {mib['held']} MiB"
        assert r["full"] > 100 * 2**20, message
        assert r["full"] > 2 * r["peak"], message
        assert r["full"] > 2 * r["held"], message
        assert r["full"] > 2 * r["model_state_after_init"], message  # the engine's parameter shards


def test_ranks_seeded_differently_build_rank0s_values(dist2):
    # DeepSpeed gives every rank rank 0's initial values; zero.Init draws the construction from rank 0's
    # generator (one broadcast of its state) and hands each rank its own generator back afterwards
    for r in dist2.run(zr.seeded_by_rank):
        assert r["bad"] == [] and r["partitioned"] > 0, r
    assert dist2.run(zr.seeded_by_rank)[1]["own_generator_back"] is True


def test_ranks_diverging_outside_the_torch_generator_are_refused(dist2):
    for message in dist2.run(zr.diverging_outside_torch_generator):
        assert "ranks built different initial values" in message
        assert "'Embedding.weight'" in message or "'GPT.tok.weight'" in message, message


def test_uninitialised_build_filled_by_rank0_inside_gathered_parameters(dist2, tmp_path):
    # before initialize(): GatheredParameters over zero.Init's parameters gathers their rows, and with
    # modifier_rank=0 what rank 0 wrote becomes every rank's rows (how transformers loads under ZeRO-3)
    torch.manual_seed(7)
    path = tmp_path / "linear.pt"
    torch.save(torch.nn.Linear(64, 48).state_dict(), path)
    for r in dist2.run(zr.uninitialised_then_filled_by_rank0, str(path)):
        assert r["bad"] == [] and r["inside_equal"] == [True, True] and r["partitioned"] == 1, r


def test_existing_module_is_converted_in_place(dist2):
    assert dist2.run(zr.convert_existing) == [[], []]


def test_bad_remote_device():
    assert Init(remote_device="nvme").remote_device == torch.device("cpu")  # rows go to disk at initialize()
    with pytest.raises(ValueError, match="'floppy'"):
        Init(remote_device="floppy")
    with pytest.raises(ValueError, match="dtype"):
        Init(dtype=torch.int8)


def test_single_process_and_disabled():
    # no process group: a world of one, rows are the whole parameter
    torch.manual_seed(0)
    with Init(config_dict_or_path={"zero_optimization": {"stage3_param_persistence_threshold": 100}}):
        model = GPT(PRESETS["odd"])
    torch.manual_seed(0)
    plain = GPT(PRESETS["odd"])
    assert zr.rows_match(model, plain) == []
    assert LOCAL_ROWS.get(model.blocks[0].qkv.weight).shape == (180, 60)
    with Init(enabled=False):
        untouched = GPT(PRESETS["odd"])
    assert not any(p in LOCAL_ROWS for p in untouched.parameters())
    assert not any(torch.isnan(p).any() for p in untouched.parameters())


def test_unreproducible_writes_name_the_parameter():
    class Model(torch.nn.Module):
        def __init__(self, edit: str) -> None:
            super().__init__()
            self.a = torch.nn.Linear(8, 8)
            self.b = torch.nn.Linear(8, 8)
            with torch.no_grad():
                if edit == "index":
                    self.a.weight[1].zero_()
                else:
                    self.b.weight.copy_(self.a.weight)

    cfg = {"zero_optimization": {"stage3_param_persistence_threshold": 1}}
    where = r"'Model.a.weight' \(shape \[8, 8\]\).*GatheredParameters\(param, modifier_rank=0\)"
    with pytest.raises(RuntimeError, match=where), Init(config_dict_or_path=cfg):
        Model("index")
    with (
        pytest.raises(RuntimeError, match="reads the values of parameter 'Model.a.weight'"),
        Init(config_dict_or_path=cfg),
    ):
        Model("copy")
    # the hooks and the torch-function mode are gone after an error
    x = torch.zeros(3)
    x.normal_()
    assert not torch.isnan(x).any()
