"""Write safetensors files one tensor at a time, and plan HF-style shards.

The safetensors format is an 8-byte little-endian header length, a JSON header giving each tensor's
dtype, shape and byte range, then the raw bytes. Every dtype and shape is known from the DCP
metadata before any tensor is read, so the header is written first and each tensor's bytes are
appended as soon as it is loaded and cast: memory holds one tensor, never a shard or the model.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

DTYPE_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """``"5GB"`` → 5·10⁹ bytes (HF's convention; ``GiB`` is binary). A plain number is bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(
            f"max_shard_size {text!r} is not a size; use e.g. '5GB', '500MB' or a number of bytes"
        )
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype and shape of one output tensor."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class Shard:
    """One output file and the tensors it holds, in order."""

    filename: str
    tensors: list[TensorSpec] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def plan_shards(specs: Iterable[TensorSpec], max_bytes: int) -> list[Shard]:
    """Greedy HF sharding: start a new file when the next tensor would pass ``max_bytes``."""
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if groups[-1] and size + spec.nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    if len(groups) == 1:
        return [Shard(SINGLE_NAME, groups[0])]
    n = len(groups)
    return [Shard(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def write_shard(
    path: Path,
    shard: Shard,
    load: Callable[[TensorSpec], torch.Tensor | Iterable[torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``shard`` to ``path`` (atomically), calling ``load(spec)`` for one tensor at a time.

    ``load`` returns the tensor, or its elements in row-major order as flat pieces (written as they
    come, so only one piece need be in memory).
    """
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for spec in shard.tensors:
        if spec.dtype not in DTYPE_CODES:
            raise ValueError(f"{spec.name}: dtype {spec.dtype} cannot be stored in safetensors")
        header[spec.name] = {
            "dtype": DTYPE_CODES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for spec in shard.tensors:
            loaded = load(spec)
            if isinstance(loaded, torch.Tensor):
                if loaded.dtype != spec.dtype or tuple(loaded.shape) != spec.shape:
                    raise AssertionError(
                        f"{spec.name}: loaded {loaded.dtype}{tuple(loaded.shape)}, planned {spec}"
                    )
                loaded = [loaded]
            written = 0
            for piece in loaded:
                if piece.dtype != spec.dtype:
                    raise AssertionError(f"{spec.name}: loaded a {piece.dtype} piece, planned {spec}")
                fh.write(
                    piece.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data
                )  # no copy
                written += piece.numel() * piece.element_size()
            del loaded
            if written != spec.nbytes:
                raise AssertionError(f"{spec.name}: wrote {written} bytes, planned {spec.nbytes}")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_index(out_dir: Path, shards: list[Shard]) -> None:
    """HF's ``model.safetensors.index.json``: total size and the file of each tensor."""
    body = {
        "metadata": {"total_size": sum(s.nbytes for s in shards)},
        "weight_map": {t.name: s.filename for s in shards for t in s.tensors},
    }
    (out_dir / INDEX_NAME).write_text(json.dumps(body, indent=2) + "\n")
