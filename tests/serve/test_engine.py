"""The serving engine on a tiny random Llama: continuous batching vs each request alone, chunked prefill,
preemption, prefix sharing, block accounting, sampling options and scheduler counters.

Greedy tokens are compared for identity with Hugging Face ``generate`` on each prompt alone (batch 1).
The ragged forward computes each token's row with the same operations as HF; only the summation order
of matmuls (BLAS blocking depends on the number of rows) and of the attention softmax differs, an fp32
change of at most ~K * 2**-24 relative per dot product of length K <= 96 (see the tolerance below). A
token flips only when two top logits are that close, which these seeds do not produce.
"""

from __future__ import annotations

import pytest
import torch
from serve_tiny import CharTokenizer, random_prompts, reference_greedy, tiny_llama

from deepshard.config import ConfigError
from deepshard.inference.paged import RaggedBatch, RaggedEntry
from deepshard.serve import SamplingParams, ServeEngine
from deepshard.serve.sequence import FinishReason


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _engine(model, **kw) -> ServeEngine:
    cfg = dict(num_kv_blocks=64, block_size=4, max_ragged_batch_size=16, max_ragged_sequence_count=8)
    cfg.update(kw)
    return ServeEngine(model, **cfg)


@pytest.mark.parametrize(
    "kw",
    [
        {},  # prompts chunked by a 16-token budget, 8 sequences per pass
        {"num_kv_blocks": 16},  # a pool too small for all: preemption by recompute
        {"max_ragged_batch_size": 64, "max_ragged_sequence_count": 64, "block_size": 16},  # one-shot prefills
    ],
    ids=["chunked", "preempting", "wide"],
)
def test_greedy_matches_each_request_alone(model, kw):
    prompts = random_prompts(10, 3, 30, seed=1)
    lengths = [4 + 3 * i for i in range(10)]
    eng = _engine(model, **kw)
    seqs = eng.generate(prompts, [SamplingParams(max_tokens=n) for n in lengths])
    for prompt, n, seq in zip(prompts, lengths, seqs, strict=True):
        assert seq.output == reference_greedy(model, prompt, n)
        assert seq.finish_reason is FinishReason.LENGTH
    c = eng.scheduler.counters
    eng.scheduler.allocator.check_all_free()
    assert eng.scheduler.allocator.num_used == 0
    assert c.finished == 10 and c.aborted == 0
    assert c.sampled_tokens == sum(lengths)
    assert c.decode_tokens + c.prefill_tokens == c.scheduled_tokens
    assert c.slot_steps == c.passes * eng.config.max_ragged_sequence_count
    if kw.get("num_kv_blocks") == 16:
        assert c.preemptions > 0
    else:
        assert c.preemptions == 0
        # every prompt token is run once, every output token but the last is fed back once
        assert c.prefill_tokens + c.prefix_hit_tokens == sum(map(len, prompts))
        assert c.decode_tokens == sum(lengths) - len(lengths)


def test_decodes_never_wait_for_a_long_prompt(model):
    """Dynamic SplitFuse: a 300-token prompt admitted in 16-token chunks leaves every decode 1 pass apart."""
    eng = _engine(model, num_kv_blocks=128)
    short = random_prompts(4, 4, 8, seed=2)
    rids = [eng.add_request(p, SamplingParams(max_tokens=40)) for p in short]
    for _ in range(3):
        eng.step()
    eng.add_request(random_prompts(1, 300, 300, seed=3)[0], SamplingParams(max_tokens=4))
    seqs = [eng._requests[r] for r in rids]
    while eng.has_unfinished():
        eng.step()
    assert max(s.max_gap for s in seqs) == 1
    assert eng.scheduler.counters.prefill_tokens >= 300


def test_chunked_prefill_logits_equal_one_shot(model):
    """Logits of a 40-token prompt run in chunks 7+13+20 equal one 40-token pass.

    Tolerance: the chunks see the same keys; only reduction orders differ (matmul blocking for another
    number of rows, softmax over a differently shaped score matrix). Each dot product of length K
    (K <= 96 here: hidden 64, MLP 96, at most 40 keys) changes by <= K * u * sum|terms|, u = 2**-24;
    over 2 layers + the LM head (3 levels, random-init layers with gain ~1) that is
    3 * 96 * 2**-24 * max|logit| ~ 1.7e-5 * max|logit|.
    """
    fused = _engine(model).model
    tokens = torch.tensor(random_prompts(1, 40, 40, seed=4)[0])
    table = list(range(10))

    def run(chunks: list[int]) -> torch.Tensor:
        cache = fused.new_paged_cache(10, 4)
        out, start = [], 0
        for n in chunks:
            batch = RaggedBatch.build([RaggedEntry(table, start, n)], 4)
            out.append(fused(tokens[None, start : start + n], cache, batch, all_logits=True)[0])
            start += n
        return torch.cat(out)

    with torch.inference_mode():
        one, chunked = run([40]), run([7, 13, 20])
        hf = model(tokens[None]).logits[0]
    tol = 3 * 96 * 2**-24 * float(one.abs().max())
    assert (chunked - one).abs().max() <= tol
    assert (one - hf).abs().max() <= tol


def test_prefix_sharing_reuses_blocks(model):
    """Prompts with a common 16-token prefix: the second and later skip its 4 blocks and match HF."""
    common = random_prompts(1, 16, 16, seed=5)[0]
    tails = random_prompts(3, 3, 6, seed=6)
    prompts = [common + t for t in tails]
    eng = _engine(model)
    first = eng.generate(prompts[:1], SamplingParams(max_tokens=5))
    rest = eng.generate(prompts[1:], SamplingParams(max_tokens=5))
    for prompt, seq in zip(prompts, first + rest, strict=True):
        assert seq.output == reference_greedy(model, prompt, 5)
    assert eng.scheduler.counters.prefix_hit_tokens == 2 * 16
    eng.scheduler.allocator.check_all_free()


def test_prefix_blocks_shared_while_running(model):
    """Two live sequences with one prompt share its full blocks (ref count 2), each owns its tail."""
    prompt = random_prompts(1, 13, 13, seed=7)[0]
    eng = _engine(model)
    a = eng.add_request(prompt, SamplingParams(max_tokens=8))
    eng.step()  # 13 tokens: a's prompt computed, 3 full blocks registered
    b = eng.add_request(prompt, SamplingParams(max_tokens=8))
    eng.step()
    sa, sb = eng._requests[a], eng._requests[b]
    assert sa.block_table[:3] == sb.block_table[:3]
    assert all(eng.scheduler.allocator.refs(blk) == 2 for blk in sa.block_table[:3])
    assert sa.block_table[3] != sb.block_table[3]
    while eng.has_unfinished():
        eng.step()
    assert sa.output == sb.output == reference_greedy(model, prompt, 8)
    eng.scheduler.allocator.check_all_free()


def test_abort_frees_blocks(model):
    eng = _engine(model)
    rid = eng.add_request(random_prompts(1, 20, 20, seed=8)[0], SamplingParams(max_tokens=50))
    for _ in range(3):
        eng.step()
    assert eng.scheduler.allocator.num_used > 0
    eng.abort(rid)
    assert not eng.has_unfinished()
    eng.scheduler.allocator.check_all_free()
    assert eng.scheduler.counters.aborted == 1


def test_seeded_sampling_is_independent_of_the_batch(model):
    prompts = random_prompts(4, 5, 12, seed=9)
    sp = SamplingParams(max_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=123)
    together = [s.output for s in _engine(model).generate(prompts, sp)]
    alone = [_engine(model).generate([p], sp)[0].output for p in prompts]
    assert together == alone
    other = _engine(model).generate(prompts[:1], SamplingParams(max_tokens=10, temperature=0.8, seed=124))[0]
    assert other.output != together[0]  # a different seed draws differently (10 draws at temperature 0.8)
    top1 = _engine(model).generate(prompts, SamplingParams(max_tokens=10, temperature=1.5, top_k=1, seed=1))
    assert [s.output for s in top1] == [reference_greedy(model, p, 10) for p in prompts]


def test_top_p_keeps_the_smallest_set_reaching_p():
    from deepshard.serve.sampling import filter_logits

    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = torch.isfinite(filter_logits(probs.log(), 0, 0.8))
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(filter_logits(probs.log(), 0, 0.1)).tolist() == [True, False, False, False]
    assert torch.isfinite(filter_logits(probs.log(), 3, 1.0)).tolist() == [True, True, True, False]


def test_stop_strings_eos_and_text():
    model = tiny_llama(eos_token_id=None)
    eng = ServeEngine(model, CharTokenizer(), num_kv_blocks=64, block_size=4)
    full = eng.generate(["hello world"], SamplingParams(max_tokens=20))[0]
    stop = full.text[8:10]
    cut = eng.generate(["hello world"], SamplingParams(max_tokens=20, stop=(stop,)))[0]
    assert cut.finish_reason is FinishReason.STOP
    assert cut.text == full.text[: full.text.find(stop)]
    eos = full.output[5]
    ended = eng.generate(["hello world"], SamplingParams(max_tokens=20, stop_token_ids=(eos,)))[0]
    assert ended.finish_reason is FinishReason.STOP
    assert ended.output == full.output[: full.output.index(eos) + 1]
    eng.scheduler.allocator.check_all_free()


def test_streamed_outputs_concatenate_to_the_result():
    model = tiny_llama()
    eng = ServeEngine(model, CharTokenizer(), num_kv_blocks=64, block_size=4)
    rid = eng.add_request("abc", SamplingParams(max_tokens=12, stop=("zz",)))
    ids, text, finished = [], "", False
    while eng.has_unfinished():
        for out in eng.step():
            assert out.request_id == rid and not finished
            ids += out.new_token_ids
            text += out.new_text
            finished = out.finished
    assert finished and len(ids) == 12
    assert text == CharTokenizer().decode(ids).split("zz")[0]


def test_bad_requests_and_config(model):
    eng = _engine(model)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="context"):
        eng.add_request([1] * 500, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="num_kv_blocks"):
        eng.add_request([1] * 250, SamplingParams(max_tokens=20))
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([])
    with pytest.raises(ConfigError, match="max_ragged_batchsize"):
        ServeEngine(model, max_ragged_batchsize=8)
    with pytest.raises(ConfigError, match="max_ragged_sequence_count"):
        ServeEngine(model, max_ragged_batch_size=8, max_ragged_sequence_count=16)
