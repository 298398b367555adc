"""Automatic tensor parallelism (``init_inference(tensor_parallel={"tp_size": P})``) on gloo ranks vs the
whole model: shard arithmetic, logits within a derived bound, greedy tokens identical."""

from __future__ import annotations

import pytest

from deepshard.inference.autotp import shard_offset, shard_size

pytest.importorskip("transformers")

import autotp_runs as ar  # noqa: E402

# The split model computes the same sums as the whole one in another order (row-parallel partial
# products summed by all_reduce). As in docs/testing.md: its distance from the float64 model is at most
# KAPPA times the whole fp32 model's own distance from it, KAPPA = 2, so
#     d(TP, fp32) <= d(fp32, exact) + d(TP, exact) <= (1 + KAPPA) * d(fp32, exact).
KAPPA = 2


def test_shard_sizes_follow_deepspeeds_rule():
    assert [shard_size(3, 2, r) for r in range(2)] == [2, 1]  # uneven heads: the first ranks get one more
    assert [shard_offset(3, 2, r) for r in range(2)] == [0, 2]
    assert [shard_size(96, 2, r, grain=64) for r in range(2)] == [64, 32]  # whole grains, the last short
    assert [shard_size(8, 4, r) for r in range(4)] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="at least one grain"):
        shard_size(2, 3, 0)


@pytest.mark.parametrize(
    "kv_heads, heads, hidden, expect_q, expect_k",
    [(2, 4, 64, [32, 32], [16, 16]),  # grouped-query, even split; head_dim 16
     (3, 6, 96, [64, 32], [32, 16])],  # 3 key/value heads over 2 ranks: 2 + 1 (uneven)
)  # fmt: skip
def test_tp2_matches_the_whole_model(dist4, kv_heads, heads, hidden, expect_q, expect_k):
    # 4 ranks, tp_size 2: two tensor-parallel groups of 2 (ranks 0-1 and 2-3), each a whole replica
    results = dist4.run(ar.tp_against_whole, 2, kv_heads, heads, hidden)
    for rank, r in enumerate(results):
        assert r["tokens_equal"], r
        assert r["tp_vs_fp32"] <= (1 + KAPPA) * r["fp32_vs_exact"], r
        assert r["tp_vs_exact"] <= KAPPA * r["fp32_vs_exact"] + 1e-12, r
        assert r["q_rows"] == expect_q[rank % 2] and r["k_rows"] == expect_k[rank % 2], r
        assert r["mlp_cols"] == [64, 32][rank % 2], r  # intermediate 96 in grains of 64


def test_tp_size_that_does_not_divide_the_world_is_refused(dist4):
    with pytest.raises(Exception, match="does not divide the 4 ranks"):
        dist4.run(ar.tp_against_whole, 3, 3, 6, 96)
