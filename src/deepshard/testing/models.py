"""Small GPT-style language model used by the example, the tests and the benchmarks.

Pre-norm transformer blocks (causal self-attention via ``scaled_dot_product_attention`` and a GELU
MLP), learned positions, and an LM head tied to the token embedding (a tied weight, as in GPT-2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class GPTConfig:
    """Shape of the model. ``d_ff`` defaults to ``4 * d_model``."""

    vocab_size: int = 256
    seq_len: int = 128
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int | None = None
    tie_embeddings: bool = True
    dropout: float = 0.0
    # The key bias gets an exactly-zero gradient in theory (softmax ignores a per-row constant), so
    # in practice its gradient is rounding noise that Adam amplifies; parity tests turn it off.
    qkv_bias: bool = True

    @property
    def ff(self) -> int:
        """Hidden width of the MLP."""
        return self.d_ff or 4 * self.d_model


PRESETS: dict[str, GPTConfig] = {
    # ~0.12M parameters: unit and parity tests
    "tiny": GPTConfig(vocab_size=256, seq_len=64, d_model=64, n_layers=2, n_heads=4, qkv_bias=False),
    # ~0.1M with sizes that do not divide by 2, 3 or 4 (ZeRO shard padding): parity tests
    "odd": GPTConfig(vocab_size=251, seq_len=33, d_model=60, n_layers=2, n_heads=3, qkv_bias=False),
    # ~3.2M: the README example on 2 CPU cores
    "small-bytes": GPTConfig(vocab_size=256, seq_len=128, d_model=256, n_layers=4, n_heads=8),
    # ~23M: benchmark "small" (6 layers, d_model 512, vocab 8192, seq 128)
    "small": GPTConfig(vocab_size=8192, seq_len=128, d_model=512, n_layers=6, n_heads=8),
    # ~124M: GPT-2-small shape
    "medium": GPTConfig(vocab_size=50304, seq_len=128, d_model=768, n_layers=12, n_heads=12),
}


class Block(nn.Module):
    """One pre-norm transformer layer."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.ff)
        self.out = nn.Linear(cfg.ff, cfg.d_model)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        # (b, t, d) -> (b, heads, t, d/heads)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        drop = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    """Decoder-only language model. ``forward(idx, targets)`` returns the mean cross-entropy loss."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok.weight
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of shape (batch, seq, vocab), or the scalar loss when ``targets`` is given."""
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        if targets is None:
            return logits
        # the loss in fp32 at least: half-precision logits are upcast, a float64 reference stays float64
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def num_parameters(model: nn.Module) -> int:
    """Unique parameter count (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
