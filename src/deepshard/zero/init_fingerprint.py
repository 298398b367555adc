"""Cross-rank fingerprints of what ``zero.Init`` built: exact, order-insensitive checksums of tensors.

Every rank must build the same model with the same initial values; ``zero.Init`` compares these numbers
across ranks (one small all-reduce) and names the first parameter that differs.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

import torch

MOD = (1 << 61) - 1  # fingerprints are exact integers modulo this prime
_BLOCK = 1024  # 64-bit words per checksum block


def fold(fingerprint: int, value: int) -> int:
    """Append ``value`` to a rolling fingerprint (order-sensitive, exact)."""
    return (fingerprint * 1_000_000_007 + (value % MOD) + 1) % MOD


def tensor_digest(tensor: torch.Tensor) -> int:
    """Exact checksum of a tensor's bytes: 64-bit words summed with wrap-around, per block and weighted by block.

    Integer sums modulo 2**64 do not depend on the reduction order, so ranks on different CPUs agree
    bit for bit; one pass over the data, about as fast as a ``sum()`` (no temporaries of its size).
    """
    flat = tensor.detach().reshape(-1)
    if (flat.storage_offset() * flat.element_size()) % 8 or not flat.is_contiguous():
        flat = flat.clone()
    raw = flat.view(torch.uint8)
    whole = raw.numel() - raw.numel() % 8
    words = raw[:whole].view(torch.int64)
    body = words.numel() - words.numel() % _BLOCK
    # (blocks + 1,): the sum of each block of words, then the sum of the remaining words (int64, wrapping)
    sums = torch.cat([words[:body].view(-1, _BLOCK).sum(dim=1), words[body:].sum().view(1)])
    weights = torch.arange(1, sums.numel() + 1, dtype=torch.int64)
    value = fold(0, raw.numel())
    value = fold(value, int(sums.sum()))
    value = fold(value, int((sums * weights).sum()))
    tail = words[body:]
    value = fold(value, int((tail * torch.arange(1, tail.numel() + 1, dtype=torch.int64)).sum()))
    for byte in raw[whole:].tolist():
        value = fold(value, byte)
    return fold(value, zlib.crc32(f"{tensor.dtype}{tuple(tensor.shape)}".encode()))


def scalar_digest(value: Any) -> int | None:
    """A rank-independent number for an operation's non-tensor argument (``None``: not comparable)."""
    if isinstance(value, bool | int):
        return int(value)
    if isinstance(value, float):
        return int.from_bytes(struct.pack("<d", value), "little")
    if isinstance(value, str | torch.dtype):
        return zlib.crc32(str(value).encode())
    return None
