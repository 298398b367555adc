"""Weight-only group-wise int8/int4: storage, error bounds, and the quantized model against the float one.

Bounds. Rounding to nearest moves each weight by at most half a quantization step: ``scale / 2`` per
group (symmetric); asymmetric rounds the zero point too, which can cost one more half step at the top
of the range, so ``scale``. A linear output then differs by at most ``sum_j |x_j| * bound_j`` (checked
with a 1e-5 relative allowance for fp32 summation).
"""

from __future__ import annotations

import pytest
import torch
from hf_tiny import VOCAB, build
from torch import nn

from deepshard.inference import QuantizedLinear, init_inference
from deepshard.inference.quant import pack_int4, quantize_linears, unpack_int4


def test_int4_packing_round_trips() -> None:
    q = torch.randint(-7, 8, (5, 12), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q), signed=True), q.to(torch.int16))
    u = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    assert pack_int4(u).shape == (5, 6) and torch.equal(unpack_int4(pack_int4(u), signed=False), u.to(torch.int16))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [True, False])
def test_error_bounds_and_storage(bits: int, symmetric: bool) -> None:
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(64, 24, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(24, 64, generator=g) * torch.linspace(0.01, 2.0, 64))
    ql = QuantizedLinear(lin, bits=bits, group_size=16, symmetric=symmetric)
    step_bound = ql.scale * (0.5 if symmetric else 1.0)  # [out, groups]
    err = (ql.dequantized() - lin.weight.detach()).abs().reshape(24, 4, 16)
    assert bool((err <= step_bound[..., None] * (1 + 1e-6)).all())
    assert float(err.max()) > 0  # it really is quantized
    x = torch.randn(3, 64, generator=g)
    bound = x.abs() @ step_bound.repeat_interleave(16, dim=1).T
    assert bool(((ql(x) - lin(x).detach()).abs() <= bound * (1 + 1e-5) + 1e-6).all())
    weight_bytes = 24 * 64 * bits // 8
    assert ql.storage_bytes() == weight_bytes + 24 * 4 * 4 * (1 if symmetric else 2)


def test_bad_group_size_and_unmatched_keys() -> None:
    with pytest.raises(ValueError, match="group_size=10 does not divide the layer's input size 64"):
        QuantizedLinear(nn.Linear(64, 8), bits=8, group_size=10, symmetric=True)
    model = build("llama")
    from deepshard.inference.config import PostInitQuantEntry

    with pytest.raises(ValueError, match=r"\['nope'\] match no nn.Linear"):
        quantize_linears(model, {"nope": PostInitQuantEntry(num_bits=8, group_size=16)})
    with pytest.raises(ValueError, match="matches several keys"):
        quantize_linears(model, {"mlp": PostInitQuantEntry(num_bits=8, group_size=16),
                                 "up": PostInitQuantEntry(num_bits=8, group_size=16)})


@pytest.mark.parametrize("inject", [True, False])
def test_quantized_engine_tracks_the_float_model(inject: bool) -> None:
    """int8 (group 16) layers keep logits near the float model's; int4 further but still correlated."""
    ids = torch.randint(1, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = build("llama")(ids).logits
    errs = {}
    for bits in (8, 4):
        quant = {"weight": {"post_init_quant": {"layers": {"num_bits": bits, "group_size": 16, "symmetric": False}}}}
        engine = init_inference(build("llama"), dtype=torch.float32, replace_with_kernel_inject=inject, quant=quant)
        target = engine.fused if inject else engine.module
        assert sum(isinstance(m, QuantizedLinear) for m in target.modules()) == (4 if inject else 7) * 2
        with torch.no_grad():
            errs[bits] = float((engine(ids).logits - ref).abs().max() / ref.abs().max())
        assert engine.generate(ids, max_new_tokens=3, do_sample=False).shape == (2, 13)
    # measured on this model: int8 6e-3, int4 9e-2 of max|logit|; the bounds leave >= 3x headroom
    assert errs[8] < 0.03 and errs[4] < 0.3 and errs[8] < errs[4]
