"""The comms logger: counts equal the collectives issued on 2 gloo ranks; sizes, bandwidth factors, summary."""

from __future__ import annotations

import pytest
from comms_runs import ISSUED, engine_with_comms_logger, issue_collectives

from deepshard import comm
from deepshard.comm.comms_log import bandwidth_gbps, comms_logger
from deepshard.config import load_config


def test_config_defaults_are_deepspeeds() -> None:
    cfg = load_config({"train_batch_size": 1}).comms_logger
    assert cfg.model_dump() == {
        "enabled": False,
        "prof_all": True,
        "prof_ops": [],
        "verbose": False,
        "debug": False,
    }


def test_bandwidth_definitions() -> None:
    # 1 MB in 1 ms = 8 Gbps; nccl-tests' bus factors for n = 4
    assert bandwidth_gbps("all_reduce", 10**6, 1.0, 4) == (8.0, 8.0 * 1.5)
    assert bandwidth_gbps("all_gather_into_tensor", 10**6, 1.0, 4) == (32.0, 24.0)
    assert bandwidth_gbps("reduce_scatter_tensor", 10**6, 1.0, 4) == (8.0, 6.0)
    assert bandwidth_gbps("broadcast", 10**6, 2.0, 4) == (4.0, 4.0)


def test_counts_equal_collectives_issued(dist2) -> None:
    results = dist2.run(issue_collectives)
    for r in results:
        assert r["data"] == {
            "all_reduce": {4000: ISSUED["all_reduce"]},
            "all_gather_into_tensor": {1000: ISSUED["all_gather_into_tensor"]},
            "reduce_scatter_tensor": {4000: ISSUED["reduce_scatter_tensor"]},
            "broadcast": {40: ISSUED["broadcast"]},
            "barrier": {0: ISSUED["barrier"]},
        }
        assert r["latencies_positive"]
        # n = 2: all_reduce bus factor 2(n-1)/n = 1, gather/scatter (n-1)/n = 0.5
        assert all(abs(x - 1.0) < 1e-12 for x in r["ratios"]["all_reduce"])
        assert all(abs(x - 0.5) < 1e-12 for x in r["ratios"]["all_gather_into_tensor"])
        summary = r["summary"]["summary"]
        assert (
            summary["all_reduce"][4000]["count"] == 3
            and summary["all_reduce"][4000]["msg_size_str"] == "3.91 KB"
        )
        assert r["summary"]["metadata"]["world_size"] == 2
        assert r["total_after"] == 0  # nothing recorded once disabled


def test_prof_ops_selects_collectives(dist2) -> None:
    results = dist2.run(issue_collectives, ["all_reduce", "barrier"])
    assert results[0]["data"] == {"all_reduce": {4000: 3}, "barrier": {0: 1}}


@pytest.mark.parametrize("stage", [2, 3])
def test_engine_records_its_collectives(dist2, stage) -> None:
    results = dist2.run(engine_with_comms_logger, stage)
    steps = 2
    for r in results:
        counts = r["counts"]
        assert counts.pop("all_gather") == 1  # train_tiny's own gather of the losses at the end
        # every step: the global gradient norm's one all-reduce; on CPU ranks of one host the parameters
        # live in shared memory, fenced by barriers around the update (zero/shared_params.py)
        if stage == 2:
            # the tiny model's 120K gradients fit in one 5e8-element bucket: one reduce-scatter per step;
            # two fences per step (begin_update, finish_update)
            assert counts == {"reduce_scatter_tensor": steps, "all_reduce": steps, "barrier": 2 * steps}
        else:
            # one reduce-scatter per ShardGroup per step, the same number of fences every step
            assert set(counts) == {"reduce_scatter_tensor", "all_reduce", "barrier"}, counts
            assert counts["all_reduce"] == steps, counts
            assert counts["reduce_scatter_tensor"] % steps == 0 and counts["barrier"] % steps == 0, counts
        assert not r["installed_after_destroy"]
    assert results[0]["counts"] == results[1]["counts"]


def test_off_by_default_installs_nothing() -> None:
    assert comm._observer is None and not comms_logger.enabled
