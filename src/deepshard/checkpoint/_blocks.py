"""Read one checkpoint tensor as a stream of bounded blocks, straight from the DCP files.

``torch.distributed.checkpoint`` reads a tensor by loading each stored chunk whole and copying it
into the target: about twice the tensor in memory. Export only needs the bytes in row-major order,
so for the layout deepshard writes (each chunk a block of dim-0 rows: a whole replicated tensor, or
a ZeRO ``Shard(0)`` shard) it reads every chunk's raw data in blocks of ``block_bytes`` and yields
them in order; peak memory is one block (and its cast), whatever the tensor's size.

This depends on how DCP's ``FileSystemWriter`` stores a chunk: one uncompressed ``torch.save``
archive at a recorded offset and length. Everything is checked before a byte is used (no storage
transforms, archive holding exactly the chunk's contiguous data, little-endian); :func:`row_blocks`
returns ``None`` when anything differs, and the caller falls back to DCP's own reader.
"""

from __future__ import annotations

import io
import re
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

import torch
from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

_DATA_RECORD = re.compile(r"(^|/)data/\d+$")


class _FileView(io.RawIOBase):
    """The bytes ``[start, start + length)`` of an open binary file, as a seekable read-only file."""

    def __init__(self, fh: IO[bytes], start: int, length: int) -> None:
        super().__init__()
        self._fh, self._start, self._length, self._pos = fh, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._length}[whence]
        self._pos = max(0, min(self._length, base + offset))
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = min(len(view), self._length - self._pos)
        if n <= 0:
            return 0
        self._fh.seek(self._start + self._pos)
        got = cast(io.BufferedReader, self._fh).readinto(view[:n]) or 0
        self._pos += got
        return got


def _row_chunks(md: TensorStorageMetadata) -> list[Any] | None:
    """The non-empty chunks of ``md`` in row order if they tile it as blocks of whole dim-0 rows."""
    size = tuple(md.size)
    if not size:
        return None
    chunks = sorted((c for c in md.chunks if all(s > 0 for s in c.sizes)), key=lambda c: c.offsets[0])
    row = 0
    for c in chunks:
        if c.offsets[0] != row or any(c.offsets[1:]) or tuple(c.sizes[1:]) != size[1:]:
            return None
        row += c.sizes[0]
    return chunks if row == size[0] else None


def row_blocks(
    root: Path,
    key: str,
    md: TensorStorageMetadata,
    storage: dict[MetadataIndex, Any],
    dtype: torch.dtype,
    block_bytes: int = 16 * 2**20,
) -> Iterator[torch.Tensor] | None:
    """Flat pieces of tensor ``key`` in row-major order, cast to ``dtype``; ``None`` if the layout is not plain.

    ``storage`` is the checkpoint metadata's ``storage_data``. Each piece holds at most
    ``block_bytes`` of stored data and is only valid until the next one is requested.
    """
    if sys.byteorder != "little":
        return None
    chunks = _row_chunks(md)
    if chunks is None:
        return None
    infos = [storage.get(MetadataIndex(key, c.offsets)) for c in chunks]
    if any(i is None or getattr(i, "transform_descriptors", None) for i in infos):
        return None  # a missing chunk, or compressed / transformed storage
    stored = md.properties.dtype
    parts = []
    for chunk, info in zip(chunks, infos):
        assert info is not None
        with open(root / info.relative_path, "rb") as fh:
            record = _data_record(_FileView(fh, info.offset, info.length), chunk.sizes, stored)
        if record is None:
            return None
        parts.append((chunk, info, record))
    return _blocks(root, parts, stored, dtype, block_bytes)


def _blocks(
    root: Path, parts: list[tuple[Any, Any, str]], stored: torch.dtype, dtype: torch.dtype, block_bytes: int
) -> Iterator[torch.Tensor]:
    itemsize = torch.empty((), dtype=stored).element_size()
    block = torch.empty(max(1, block_bytes // itemsize), dtype=stored)
    raw = memoryview(cast(Any, block.view(torch.uint8).numpy()))
    for chunk, info, record in parts:
        left = 1
        for s in chunk.sizes:
            left *= s
        with (
            open(root / info.relative_path, "rb") as fh,
            zipfile.ZipFile(_FileView(fh, info.offset, info.length)) as archive,
            archive.open(record) as src,
        ):
            while left:
                n = min(left, block.numel())
                want, got = n * itemsize, 0
                while got < want:
                    step = src.readinto(raw[got:want])  # type: ignore[attr-defined]
                    if not step:
                        raise ValueError(
                            f"{root / info.relative_path}: a stored chunk ends early (truncated file?)"
                        )
                    got += step
                piece = block[:n]
                yield piece if dtype == stored else piece.to(dtype)
                left -= n


def _data_record(view: _FileView, sizes: Any, stored: torch.dtype) -> str | None:
    """The archive member holding exactly the chunk's data, after checking the pickled tensor's layout."""
    view.seek(0)
    meta = torch.load(
        cast(IO[bytes], view), map_location="meta", weights_only=True
    )  # reads the pickle, not the data
    if (
        not isinstance(meta, torch.Tensor)
        or meta.dtype != stored
        or tuple(meta.shape) != tuple(sizes)
        or meta.storage_offset() != 0
        or not meta.is_contiguous()
    ):
        return None
    view.seek(0)
    with zipfile.ZipFile(view) as archive:
        members = archive.infolist()
        records = [m for m in members if _DATA_RECORD.search(m.filename)]
        order = [m for m in members if m.filename.endswith("/byteorder")]
        if order and archive.read(order[0]).strip() != b"little":
            return None
        nbytes = meta.numel() * meta.element_size()
        if (
            len(records) != 1
            or records[0].compress_type != zipfile.ZIP_STORED
            or records[0].file_size != nbytes
        ):
            return None
        return records[0].filename
