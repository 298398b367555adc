"""Datasets every machine has: byte-level text from Python's own standard-library sources.

No download is needed: the text is read from the interpreter's installation, sorted by path, so every
rank and every run on the same Python version sees the same bytes.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import torch
from torch.utils.data import Dataset


def stdlib_text(max_bytes: int = 4 * 2**20) -> bytes:
    """Up to ``max_bytes`` of concatenated ``.py`` sources from the standard library, in path order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks: list[bytes] = []
    total = 0
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or "test" in path.parts:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise RuntimeError(f"no Python sources found under {root}; pass another text source")
    return b"".join(chunks)[:max_bytes]


class ByteTextDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Non-overlapping windows of ``seq_len + 1`` bytes: ``(input, target)`` shifted by one byte."""

    def __init__(self, text: bytes, seq_len: int) -> None:
        if len(text) < seq_len + 1:
            raise ValueError(f"the text has {len(text)} bytes, fewer than one window of {seq_len + 1}")
        self.data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        self.seq_len = seq_len

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = index * self.seq_len
        window = self.data[start : start + self.seq_len + 1]
        return window[:-1], window[1:]


class RandomTokenDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Deterministic random token sequences (for benchmarks with a large vocabulary)."""

    def __init__(self, vocab_size: int, seq_len: int, size: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab_size, (size, seq_len + 1), generator=gen)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.tokens[index]
        return row[:-1], row[1:]


def default_text_bytes() -> int:
    """Bytes of text the example reads (``DEEPSHARD_TEXT_BYTES`` overrides)."""
    return int(os.environ.get("DEEPSHARD_TEXT_BYTES", str(4 * 2**20)))
