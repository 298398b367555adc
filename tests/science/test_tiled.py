"""Tiled MLP and tiled logits + loss vs the untiled ops: values and gradients (float64: 1e-12), memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from deepshard.sequence import TiledMLP, tiled_logits_loss

TOL = 1e-12


class SwiGLU(torch.nn.Module):
    def __init__(self, h: int, f: int) -> None:
        super().__init__()
        self.gate, self.up, self.down = torch.nn.Linear(h, f), torch.nn.Linear(h, f), torch.nn.Linear(f, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def _mlp_fn(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(x)


@pytest.mark.parametrize("shards", [1, 3, 7])  # 7 does not divide 20: a ragged last tile
def test_tiled_mlp_equals_untiled(shards):
    torch.manual_seed(0)
    mlp = SwiGLU(6, 16).double()
    x = torch.randn(2, 20, 6, dtype=torch.float64, requires_grad=True)
    dout = torch.randn(2, 20, 6, dtype=torch.float64)
    (mlp(x) * dout).sum().backward()
    want = [x.grad.clone(), *(p.grad.clone() for p in mlp.parameters())]
    x.grad = None
    mlp.zero_grad()
    out = TiledMLP.apply(_mlp_fn, mlp, x, shards)
    torch.testing.assert_close(out, mlp(x), rtol=0, atol=TOL)
    (out * dout).sum().backward()
    for got, ref in zip([x.grad, *(p.grad for p in mlp.parameters())], want):
        torch.testing.assert_close(got, ref, rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="compute_params"):
        TiledMLP.apply(_mlp_fn, mlp, x, shards, [mlp.gate.weight])


@pytest.mark.parametrize("shards", [1, 4, 5])
def test_tiled_logits_loss_equals_untiled(shards):
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 13, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (2, 13), generator=g)
    labels[0, :4] = -100  # ignored tokens (padding / prompt)
    ref = F.cross_entropy((hidden @ weight.T).reshape(-1, 50), labels.reshape(-1), ignore_index=-100)
    want = torch.autograd.grad(ref, (hidden, weight))
    got_loss = tiled_logits_loss(hidden, weight, labels, shards=shards)
    torch.testing.assert_close(got_loss, ref, rtol=0, atol=TOL)
    got = torch.autograd.grad(got_loss * 1.0, (hidden, weight))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="labels shape"):
        tiled_logits_loss(hidden, weight, labels[:, :3])


def test_tiled_loss_peak_memory_is_a_tile():
    from torch.distributed._tools.mem_tracker import MemTracker

    tokens, vocab, h = 1024, 4096, 32  # logits: 16 MiB in fp32
    hidden = torch.randn(tokens, h, requires_grad=True)
    weight = torch.randn(vocab, h, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,))

    def peak(loss_fn):
        tracker = MemTracker()
        with tracker:
            torch.autograd.grad(loss_fn(), (hidden, weight))
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

    untiled = peak(lambda: F.cross_entropy(hidden @ weight.T, labels))
    tiled = peak(lambda: tiled_logits_loss(hidden, weight, labels, shards=16))
    logits = tokens * vocab * 4
    grads = (hidden.numel() + 2 * weight.numel()) * 4  # dh, dW (+ its fp32 accumulator)
    assert untiled >= 2 * logits  # logits and their softmax / gradient
    assert tiled <= grads + 3 * logits / 16, (tiled, untiled)  # one tile: logits, softmax grad, a temporary
