"""Names and places: what a checkpoint directory holds and how it becomes visible atomically.

::

    save_dir/
      latest                      the tag of the newest complete checkpoint (text), replaced atomically
      global_step100/             one complete checkpoint (a "tag")
        .metadata  __0_0.distcp   torch.distributed.checkpoint: every tensor, by FQN, each rank its shards
        engine_state.pt           counters, schedule, loss scaler, optimizer hyper-parameters, client state
        rank_00000.pt ...         per-rank RNG states and dataloader position
        manifest.json             written last: format version and the size + CRC32 of every file above
      global_step200.tmp-<hex>/   a save in progress; renamed to its tag only when complete

A save writes into ``<tag>.tmp-<token>`` and renames it to ``<tag>`` after every rank has finished and
the manifest is on disk; ``latest`` is then replaced through a temporary file and ``os.replace``. A
process killed at any point leaves either the old state or the new one, never a half-written tag.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

LATEST = "latest"
MANIFEST = "manifest.json"
ENGINE_STATE = "engine_state.pt"
TMP_MARK = ".tmp-"
OLD_MARK = ".old-"
FORMAT = "deepshard-checkpoint"
FORMAT_VERSION = 1
# a DeepSpeed tag directory holds one of these (ZeRO-1/2, ZeRO-3) and no manifest
DEEPSPEED_MODEL_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def rank_file(rank: int) -> str:
    """Name of rank ``rank``'s RNG/dataloader file."""
    return f"rank_{rank:05d}.pt"


def default_tag(global_steps: int) -> str:
    """DeepSpeed's default tag."""
    return f"global_step{global_steps}"


def validate_tag(tag: str) -> str:
    """``tag`` if it can name a directory inside ``save_dir``; a ``ValueError`` naming the fix otherwise."""
    if not tag or tag in (".", "..") or "/" in tag or os.sep in tag or TMP_MARK in tag or OLD_MARK in tag:
        raise ValueError(
            f"checkpoint tag {tag!r} cannot name a directory inside save_dir: use a non-empty name without "
            f"path separators or {TMP_MARK!r}/{OLD_MARK!r} (e.g. 'global_step100')."
        )
    return tag


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in ``path`` durable (no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that readers see the old or the new content, never a mix."""
    tmp = path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_latest(save_dir: Path) -> str | None:
    """The tag named by ``save_dir/latest``, or ``None`` when there is no such file."""
    path = save_dir / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not tag:
        raise ValueError(
            f"{path} is empty; it should hold the tag of a checkpoint directory. Pass tag= explicitly."
        )
    return tag


def remove_stale(save_dir: Path) -> None:
    """Delete leftovers of saves that died midway (``*.tmp-*`` and ``*.old-*`` entries)."""
    if not save_dir.is_dir():
        return
    for entry in save_dir.iterdir():
        if TMP_MARK in entry.name or OLD_MARK in entry.name:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()


def commit(tmp_dir: Path, final_dir: Path, token: str) -> None:
    """Atomically make ``tmp_dir`` visible as ``final_dir`` (replacing an older save of the same tag)."""
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f"{final_dir.name}{OLD_MARK}{token}")
        os.rename(final_dir, old)
    os.rename(tmp_dir, final_dir)
    fsync_dir(final_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def is_deepspeed_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a DeepSpeed tag directory (a model-states file, no deepshard manifest)."""
    return (
        path.is_dir()
        and not (path / MANIFEST).exists()
        and any((path / name).is_file() for name in DEEPSPEED_MODEL_FILES)
    )


def resolve_checkpoint(checkpoint_dir: str | os.PathLike[str], tag: str | None) -> Path:
    """The tag directory for a ``save_dir`` (+ ``tag`` or its ``latest``), or a tag directory itself.

    DeepSpeed's directories are resolved the same way (they have a ``latest`` file too). Raises ``FileNotFoundError`` naming what is missing.
    """
    root = Path(checkpoint_dir)
    if tag is None and ((root / MANIFEST).is_file() or is_deepspeed_checkpoint(root)):
        return root
    if tag is None:
        tag = read_latest(root)
        if tag is None:
            raise FileNotFoundError(
                f"{root} holds neither a checkpoint ({MANIFEST}) nor a '{LATEST}' file; pass the directory given "
                "to save_checkpoint (or one of its tag directories) or name the tag."
            )
    path = root / tag
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint tag directory {path} does not exist")
    return path
