"""DS4Sci_EvoformerAttention vs naive attention: values, gradients, masking, memory, the AlphaFold uses.

Tolerances. A float64 naive reference is the truth. Our chunked online softmax in precision ``p`` is
compared with the naive implementation in the same precision: its error vs float64 may be at most
``ROUNDING_FACTOR`` times the naive one (the online softmax rescales each row once per key chunk and sums
in a different order: a few more roundings per element, never a different algorithm), with a floor of
one unit of ``p`` at the output's magnitude for when the naive error happens to be tiny.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from deepshard.ops.deepspeed4science import DS4Sci_EvoformerAttention
from deepshard.ops.deepspeed4science.evoformer_attn import chunk_sizes

ROUNDING_FACTOR = 4.0


def naive(q, k, v, biases, dtype):
    """DeepSpeed's reference formula in ``dtype``, one N-slice at a time (bounds the reference's memory)."""
    outs = []
    for n in range(q.shape[1]):
        sl = slice(n, n + 1)
        qn, kn, vn = (x[:, sl].to(dtype).transpose(-2, -3) for x in (q, k, v))  # [B, 1, H, L, D]
        a = torch.matmul(qn, kn.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        for b in biases:
            a = a + (b[:, sl] if b.shape[1] != 1 else b).to(dtype)
        outs.append(torch.matmul(torch.softmax(a, dim=-1), vn).transpose(-2, -3))
    return torch.cat(outs, dim=1)


def inputs(shape, dtype, seed=0, grad=False):
    b, n, length, h, d = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=g).to(dtype).requires_grad_(grad) for _ in range(3))
    mask = torch.randint(0, 2, (b, n, 1, 1, length), generator=g).to(dtype)
    mask_bias = 1e9 * (mask - 1)  # DeepSpeed's test: -1e9 (fp16: -inf) where masked
    pair = torch.randn((b, 1, h, length, length), generator=g).to(dtype).requires_grad_(grad)
    return q, k, v, mask_bias, pair


def assert_close_as_naive(ours, ref64, naive_same, dtype, what):
    err = (ours.double() - ref64).abs().max().item()
    naive_err = (naive_same.double() - ref64).abs().max().item()
    floor = torch.finfo(dtype).eps * ref64.abs().max().item()
    bound = ROUNDING_FACTOR * max(naive_err, floor)
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g} (naive {dtype} error {naive_err:.3g})"


@pytest.mark.parametrize("shape,n_used", [((1, 256, 256, 4, 32), 256), ((1, 512, 256, 8, 8), 32)])
def test_forward_at_deepspeed_shapes_fp32(shape, n_used):
    # Attention is independent per N slice. At (1, 256, 256, 4, 32) ours runs on the whole shape and
    # 16 slices are checked; at (1, 512, 256, 8, 8) (268M logits: ~1 min on a busy 2-core CPU) the first
    # 32 of the 512 slices are computed (the benchmark runs the whole shape).
    q, k, v, mask_bias, pair = inputs(shape, torch.float32)
    q, k, v, mask_bias = (x[:, :n_used] for x in (q, k, v, mask_bias))
    with torch.no_grad():
        ours = DS4Sci_EvoformerAttention(q, k, v, [mask_bias, pair])
        picked = [x[:, :16] for x in (q, k, v, mask_bias)]
        ref = naive(*picked[:3], [picked[3], pair], torch.float64)
        same = naive(*picked[:3], [picked[3], pair], torch.float32)
    assert ours.shape == (1, n_used, *shape[2:]) and ours.dtype == torch.float32
    assert_close_as_naive(ours[:, :16], ref, same, torch.float32, f"output at {shape}")


def _grads(fn, tensors, grad_out):
    out = fn(*tensors)
    return [out, *torch.autograd.grad(out, tensors, grad_out)]


@pytest.mark.parametrize(
    "dtype,shape,chunk",
    [
        (torch.float32, (2, 6, 48, 4, 16), 1 << 22),  # one chunk
        (torch.float32, (2, 3, 40, 4, 16), 700),  # several N, query and key chunks, ragged tails
        (torch.bfloat16, (1, 2, 24, 2, 8), 300),
        (torch.float16, (1, 2, 24, 2, 8), 300),
    ],
)
def test_forward_backward_vs_float64(dtype, shape, chunk):
    q, k, v, mask_bias, pair = inputs(shape, dtype, grad=True)
    grad_out = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    tensors = (q, k, v, pair)
    ours = _grads(lambda q, k, v, p: DS4Sci_EvoformerAttention(q, k, v, [mask_bias, p], max_chunk_elements=chunk),
                  tensors, grad_out)  # fmt: skip
    t64 = [t.detach().double().requires_grad_() for t in tensors]
    ref = _grads(
        lambda q, k, v, p: naive(q, k, v, [mask_bias.double(), p], torch.float64), t64, grad_out.double()
    )
    same = _grads(lambda q, k, v, p: naive(q, k, v, [mask_bias, p], dtype), tensors, grad_out)
    for name, a, r, s in zip(["out", "dQ", "dK", "dV", "dpair"], ours, ref, same):
        assert a.dtype == dtype and a.shape == r.shape
        assert_close_as_naive(a, r, s, dtype, f"{name} {dtype} chunk={chunk}")


def test_gradcheck_float64_with_mask_grad_and_ragged_chunks():
    shape = (1, 2, 7, 2, 3)
    q, k, v, mask_bias, pair = inputs(shape, torch.float64, grad=True)
    soft_mask = torch.randn(
        mask_bias.shape, dtype=torch.float64, requires_grad=True
    )  # a mask bias with a gradient
    assert chunk_sizes(1, 2, 7, 7, 2, 12) == (1, 3, 2)  # ragged query and key chunks

    def fn(q, k, v, m, p):
        return DS4Sci_EvoformerAttention(q, k, v, [m, p], max_chunk_elements=12)

    assert torch.autograd.gradcheck(fn, (q, k, v, soft_mask, pair), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: DS4Sci_EvoformerAttention(q, k, v, []), (q, k, v), fast_mode=True
    )
    assert torch.autograd.gradcheck(
        lambda q, k, v, p: DS4Sci_EvoformerAttention(q, k, v, [None, p]), (q, k, v, pair), fast_mode=True
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fully_masked_rows_give_zeros_not_nan(dtype):
    shape = (1, 3, 20, 2, 4)
    q, k, v, _, pair = inputs(shape, dtype, grad=True)
    mask = torch.zeros((1, 3, 1, 1, 20), dtype=dtype)
    mask[0, 1] = -math.inf  # every key of slice n=1 masked
    mask[0, 2, ..., :5] = -math.inf
    out = DS4Sci_EvoformerAttention(q, k, v, [mask, pair], max_chunk_elements=64)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v, pair))
    assert not out.isnan().any() and all(not g.isnan().any() for g in grads)
    assert out[0, 1].abs().max() == 0 and grads[0][0, 1].abs().max() == 0
    ref = naive(q.detach(), k.detach(), v.detach(), [mask, pair.detach()], torch.float64)
    tol = 4 * torch.finfo(dtype).eps * ref[0, [0, 2]].abs().max().item() * 8  # 8: output and input rounding
    assert (out[0, [0, 2]].double() - ref[0, [0, 2]]).abs().max().item() <= tol


def test_shape_and_dtype_errors_name_the_value():
    q, k, v, mask_bias, pair = inputs((1, 2, 18, 2, 4), torch.float32)
    with pytest.raises(ValueError, match=r"biases\[1\] \(pair bias\) has shape \(1, 2, 2, 18, 18\)"):
        DS4Sci_EvoformerAttention(q, k, v, [mask_bias, pair.expand(1, 2, 2, 18, 18)])
    with pytest.raises(ValueError, match="5 dims"):
        DS4Sci_EvoformerAttention(q[0], k[0], v[0], [])
    with pytest.raises(ValueError, match="one dtype"):
        DS4Sci_EvoformerAttention(q, k.half(), v, [])
    with pytest.raises(ValueError, match="at most 2 biases"):
        DS4Sci_EvoformerAttention(q, k, v, [mask_bias, pair, pair])


# ---------------------------------------------------------------- the four AlphaFold uses
C, H, D = 6, 2, 4


def _use(kind, msa, pair, msa_mask, pair_mask, w):
    """(Q, K, V, biases) for one Evoformer attention, built like OpenFold builds them; ``w``: weights."""
    if kind in ("msa_row", "msa_col"):
        x, mask = (msa, msa_mask) if kind == "msa_row" else (msa.transpose(1, 2), msa_mask.transpose(1, 2))
    else:
        x, mask = (
            (pair, pair_mask) if kind == "tri_start" else (pair.transpose(1, 2), pair_mask.transpose(1, 2))
        )
    b, n, length, _ = x.shape
    q, k, v = (torch.einsum("bnlc,chd->bnlhd", x, w[name]) for name in "qkv")
    biases = [(1e9 * (mask - 1))[:, :, None, None, :]]
    if kind != "msa_col":  # pair bias (MSA row) or triangle bias: [B, 1, H, L, L]
        z = pair if kind != "tri_end" else pair.transpose(1, 2)
        biases.append(torch.einsum("bijc,ch->bhij", z, w["b"])[:, None])
    return q, k, v, biases


@pytest.mark.parametrize("kind", ["msa_row", "msa_col", "tri_start", "tri_end"])
def test_alphafold_uses_match_sdpa_with_float_bias(kind):
    g = torch.Generator().manual_seed(1)
    b, s, r = 1, 5, 19
    msa = torch.randn(b, s, r, C, generator=g, dtype=torch.float64, requires_grad=True)
    pair = torch.randn(b, r, r, C, generator=g, dtype=torch.float64, requires_grad=True)
    msa_mask = (torch.rand(b, s, r, generator=g) > 0.2).double()
    pair_mask = (torch.rand(b, r, r, generator=g) > 0.2).double()
    w = {name: torch.randn(C, H, D, generator=g, dtype=torch.float64) for name in "qkv"}
    w["b"] = torch.randn(C, H, generator=g, dtype=torch.float64)

    q, k, v, biases = _use(kind, msa, pair, msa_mask, pair_mask, w)
    ours = DS4Sci_EvoformerAttention(q, k, v, biases, max_chunk_elements=200)
    heads_first = [x.transpose(-2, -3) for x in (q, k, v)]  # SDPA layout [B, N, H, L, D]
    ref = F.scaled_dot_product_attention(*heads_first, attn_mask=sum(biases)).transpose(-2, -3)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    go = torch.randn(ours.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(ours, (msa, pair), go, allow_unused=True, retain_graph=True)
    want = torch.autograd.grad(ref, (msa, pair), go, allow_unused=True)
    for a, e in zip(got, want):
        assert (a is None) == (e is None)
        if a is not None:
            torch.testing.assert_close(a, e, rtol=0, atol=1e-11)


# ---------------------------------------------------------------- memory
def _peak_extra_bytes(fn):
    from torch.distributed._tools.mem_tracker import MemTracker

    tracker = MemTracker()
    with tracker:
        fn()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]


def test_peak_extra_memory_is_bounded_by_the_chunk_not_by_l_squared():
    shape = (1, 16, 128, 4, 8)  # naive logits: 16*4*128*128 fp32 = 4 MiB per copy
    q, k, v, mask_bias, pair = inputs(shape, torch.float32, grad=True)
    chunk = 1 << 16  # 256 KiB of logits

    def run(attn):
        out = attn(q, k, v, mask_bias, pair)
        torch.autograd.grad(out, (q, k, v, pair), torch.ones_like(out))

    ours = _peak_extra_bytes(
        lambda: run(lambda *a: DS4Sci_EvoformerAttention(*a[:3], list(a[3:]), max_chunk_elements=chunk))
    )
    ref = _peak_extra_bytes(lambda: run(lambda q, k, v, m, p: naive(q, k, v, [m, p], torch.float32)))
    io = 4 * q.numel() * 4 + pair.numel() * 4  # out + dQ/dK/dV and dpair: unavoidable, the same for both
    logits_copy = 16 * 4 * 128 * 128 * 4
    assert ref >= logits_copy  # the naive path keeps at least the softmax for backward
    # ours: the unavoidable outputs, fp32 accumulators for dK/dV/dpair, and a few chunk-sized temporaries
    assert ours <= io + 3 * q.numel() * 4 + pair.numel() * 4 + 8 * chunk * 4, (ours, ref)
    assert ours <= 0.5 * ref, (ours, ref)
