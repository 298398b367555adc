"""The manifest: the last file a save writes, and the first one a load checks.

``manifest.json`` records the format version and, for every other file of the checkpoint, its size
and CRC32. Loading compares them before any tensor is read, so a truncated or corrupted file fails
with an error that names it instead of producing wrong weights. Checksumming is split across ranks
(file ``i`` goes to rank ``i % world``): each byte is read back once per save and once per load.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any

from deepshard.checkpoint import _dist
from deepshard.checkpoint.layout import FORMAT, FORMAT_VERSION, MANIFEST

_CHUNK = 8 << 20


class CorruptCheckpointError(ValueError):
    """A checkpoint file is missing, truncated or altered; the message names the file."""


def file_digest(path: Path) -> dict[str, Any]:
    """``{"bytes": size, "crc32": hex}`` of one file, read in 8 MiB chunks."""
    crc = 0
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"bytes": size, "crc32": f"{crc:08x}"}


def _my_share(names: list[str], group: Any) -> list[str]:
    rank, world = _dist.rank(group), _dist.world_size(group)
    return [n for i, n in enumerate(sorted(names)) if i % world == rank]


def checksum_files(directory: Path, group: Any = None) -> dict[str, dict[str, Any]]:
    """Collective: digests of every file in ``directory`` (the manifest excluded), on every rank."""
    names = [e.name for e in directory.iterdir() if e.is_file() and e.name != MANIFEST]
    mine = {n: file_digest(directory / n) for n in _my_share(names, group)}
    merged: dict[str, dict[str, Any]] = {}
    for part in _dist.all_gather_objects(mine, group):
        merged.update(part)
    return dict(sorted(merged.items()))


def write_manifest(directory: Path, files: dict[str, dict[str, Any]], info: dict[str, Any]) -> None:
    """Write ``manifest.json`` (durably) into ``directory``."""
    body = {"format": FORMAT, "version": FORMAT_VERSION, **info, "files": files}
    path = directory / MANIFEST
    with open(path, "w") as fh:
        json.dump(body, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def read_manifest(directory: Path) -> dict[str, Any]:
    """The parsed manifest; :class:`CorruptCheckpointError` naming the file when it is absent or invalid."""
    path = directory / MANIFEST
    if not path.is_file():
        raise CorruptCheckpointError(
            f"{path} is missing: {directory} is not a complete deepshard checkpoint (a save that did not finish, "
            "or a directory written by another tool)."
        )
    try:
        body = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CorruptCheckpointError(
            f"{path} is not valid JSON ({exc}); the checkpoint is corrupt."
        ) from None
    if not isinstance(body, dict) or body.get("format") != FORMAT or not isinstance(body.get("files"), dict):
        raise CorruptCheckpointError(f"{path} is not a deepshard checkpoint manifest.")
    if int(body.get("version", 0)) > FORMAT_VERSION:
        raise CorruptCheckpointError(
            f"{path} has format version {body['version']}, newer than this deepshard reads ({FORMAT_VERSION}); "
            "upgrade deepshard."
        )
    return body


def _check_file(path: Path, expected: dict[str, Any], contents: bool) -> str | None:
    if not path.is_file():
        return f"checkpoint file {path} is missing"
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"checkpoint file {path} has {size} bytes, the manifest says {expected['bytes']} (truncated or overwritten)"
    if contents:
        crc = file_digest(path)["crc32"]
        if crc != expected["crc32"]:
            return f"checkpoint file {path} is corrupt: CRC32 {crc}, the manifest says {expected['crc32']}"
    return None


def verify_local(directory: Path) -> dict[str, Any]:
    """Check every file's size and CRC32 in this process alone (no collectives); return the manifest."""
    body = read_manifest(directory)
    problems = [p for n in sorted(body["files"]) if (p := _check_file(directory / n, body["files"][n], True))]
    if problems:
        raise CorruptCheckpointError("; ".join(problems))
    return body


def verify(directory: Path, group: Any = None, contents: bool = True) -> dict[str, Any]:
    """Collective: check sizes (every rank, every file) and CRC32s (split across ranks); return the manifest.

    Raises :class:`CorruptCheckpointError` on every rank when any rank finds a problem.
    """
    error: str | None = None
    manifest: dict[str, Any] = {}
    try:
        manifest = read_manifest(directory)
        files = manifest["files"]
        mine = set(_my_share(list(files), group))
        problems = [
            p for n in sorted(files) if (p := _check_file(directory / n, files[n], contents and n in mine))
        ]
        error = "; ".join(problems) or None
    except CorruptCheckpointError as exc:
        error = str(exc)
    _dist.raise_if_any(error, group, CorruptCheckpointError)
    return manifest
