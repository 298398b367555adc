"""Kernel injection vs the Hugging Face model it replaces: logits, greedy tokens, padding, the KV cache.

Tolerance (fp32). The fused model performs the same operations as HF except that Q/K/V (and gate/up)
are one matmul and the residual add is fused with the norm; an output element of a fused matmul is
the same dot product, but a different BLAS blocking (AVX2 vs AVX-512 kernels) may sum it in another
order. For a dot product of length K <= 96 that changes the result by at most ~K * 2**-24 relative;
through 2 layers (~6 matmuls deep, attention softmax included) and logits of size O(1) this stays
below 1e-4 * max|logit|, the bound used here (typical runs agree bitwise). Greedy tokens must be
identical: a flip needs two top logits within that bound, which these seeds do not produce.
"""

from __future__ import annotations

import pytest
import torch
from hf_tiny import ARCHS, VOCAB, build

from deepshard.inference import init_inference
from deepshard.inference.kv_cache import KVCache
from deepshard.inference.ops import Rotary, rotate_in_place


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4 * float(expected.abs().max()))


def engine_for(model: torch.nn.Module, **kw: object):
    return init_inference(model, dtype=torch.float32, replace_with_kernel_inject=True, **kw)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_greedy_tokens_match_hf(arch: str) -> None:
    model = build(arch)
    ids = torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits = model(ids).logits
        ref_tokens = model.generate(ids, max_new_tokens=12, do_sample=False)
    engine = engine_for(model)
    close(engine(ids).logits, ref_logits)
    tokens = engine.generate(ids, max_new_tokens=12)
    assert tokens.shape == ref_tokens.shape == (2, 21)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt_postnorm"])
def test_left_padded_batch_matches_hf(arch: str) -> None:
    model = build(arch)
    ids = torch.randint(1, VOCAB, (3, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :1] = 0
    ids[mask == 0] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what HF's generate passes; its forward would use arange
    kwargs = {} if arch.startswith("opt") else {"position_ids": positions}  # OPT derives them from the mask
    with torch.no_grad():
        ref_logits = model(ids, attention_mask=mask, **kwargs).logits
        ref_tokens = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    engine = engine_for(model)
    logits = engine(ids, attention_mask=mask).logits
    close(logits[mask.bool()], ref_logits[mask.bool()])
    assert torch.equal(logits[~mask.bool()], torch.zeros_like(logits[~mask.bool()]))
    assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=8), ref_tokens)


def test_eos_stops_rows_and_pads_like_hf() -> None:
    model = build("llama")
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        free = model.generate(ids, max_new_tokens=6, do_sample=False)
    eos = int(free[0, 7])  # the third token row 0 produces: row 0 stops there
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=eos, pad_token_id=0)
    out = engine_for(model).generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)
    assert int(out[0, -1]) == 0


def test_continuous_batching_slots_match_separate_runs() -> None:
    """Two sequences at different lengths decode together from non-consecutive slots, as a scheduler would."""
    engine = engine_for(build("qwen2"))
    fused = engine.fused
    a = torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    b = torch.randint(1, VOCAB, (1, 3), generator=torch.Generator().manual_seed(5))
    alone_a = engine.generate(a, max_new_tokens=5)[0, 7:]
    alone_b = engine.generate(b, max_new_tokens=5)[0, 3:]
    cache = KVCache(2, 3, 2, 16, 32, dtype=torch.float32)
    nxt = {}
    for slot, prompt in ((2, a), (0, b)):  # prefill each into its own slot
        batch = cache.step(torch.tensor([slot]), prompt.shape[1])
        nxt[slot] = fused(prompt, cache, batch)[:, -1].argmax(-1)
        cache.advance(batch)
    got = {0: [nxt[0]], 2: [nxt[2]]}
    slots = torch.tensor([2, 0])
    for _ in range(4):
        batch = cache.step(slots, 1)
        assert batch.slot_range is None and batch.uniform_start is None  # the scatter/gather path
        step = fused(torch.stack([got[2][-1], got[0][-1]]), cache, batch)[:, -1].argmax(-1)
        cache.advance(batch)
        got[2].append(step[0:1])
        got[0].append(step[1:2])
    assert torch.equal(torch.cat(got[2]), alone_a)
    assert torch.equal(torch.cat(got[0]), alone_b)
    assert cache.lengths.tolist() == [3 + 4, 0, 7 + 4]


def test_rotary_in_place_is_hf_rotary_bitwise() -> None:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(6)
    q, k = torch.randn(2, 5, 4, 16, generator=g), torch.randn(2, 5, 2, 16, generator=g)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float) / 16))
    positions = torch.arange(5).repeat(2, 1) + torch.tensor([[0], [3]])
    freqs = positions[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), -1)
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), emb.cos(), emb.sin())
    cos, sin = Rotary(inv_freq, 1.0).tables(positions, torch.float32)
    qk = torch.cat([q, k], dim=2)
    rotate_in_place(qk, cos, sin)
    assert torch.equal(qk[:, :, :4], ref_q.transpose(1, 2))
    assert torch.equal(qk[:, :, 4:], ref_k.transpose(1, 2))


def test_kv_cache_overflow_names_max_out_tokens() -> None:
    engine = engine_for(build("llama"), max_out_tokens=12)
    ids = torch.randint(1, VOCAB, (1, 8))
    with pytest.raises(ValueError, match="max_out_tokens=12"):
        engine.generate(ids, max_new_tokens=5)
    assert engine.generate(ids, max_new_tokens=4).shape == (1, 12)


def test_unsupported_generate_options_and_models_are_refused() -> None:
    engine = engine_for(build("llama"))
    ids = torch.randint(1, VOCAB, (1, 4))
    with pytest.raises(ValueError, match="num_beams=2 is not implemented"):
        engine.generate(ids, max_new_tokens=2, num_beams=2)
    with pytest.raises(ValueError, match="do_sample=True is not implemented"):
        engine.generate(ids, max_new_tokens=2, do_sample=True)
    with pytest.raises(ValueError, match="does not take: \\['foo'\\]"):
        engine.generate(ids, max_new_tokens=2, foo=1)
    with pytest.raises(ValueError, match="no fused implementation for Linear"):
        init_inference(torch.nn.Linear(2, 2), dtype=torch.float32, replace_with_kernel_inject=True)


def test_without_injection_the_engine_is_the_model() -> None:
    model = build("gpt2")
    ids = torch.randint(1, VOCAB, (1, 6))
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=4, do_sample=False)
    engine = init_inference(model, dtype=torch.float32)
    assert engine.fused is None
    assert torch.equal(engine.generate(ids, max_new_tokens=4, do_sample=False), ref)


def test_default_dtype_is_deepspeeds_fp16() -> None:
    engine = init_inference(build("llama"), replace_with_kernel_inject=True)
    assert engine.fused is not None and engine.fused.dtype == torch.float16
    out = engine.generate(torch.randint(1, VOCAB, (1, 4)), max_new_tokens=2)
    assert out.shape == (1, 6)
