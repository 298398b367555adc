"""The engine's checkpoint front end: collective save (synchronous or in the background) and load.

A save runs in four steps on every rank of the data-parallel group:

1. *agree*: rank 0's tag and a fresh token name the temporary directory ``<tag>.tmp-<token>``;
2. *capture*: references to every tensor by FQN plus small Python state (:mod:`.state`); an
   asynchronous save copies the tensors to host memory here (one copy of the model state: the
   trade-off that lets training continue), a synchronous one writes the live tensors;
3. *write*: per-rank files, then ``torch.distributed.checkpoint.save`` (replicated tensors are
   de-duplicated and spread over the ranks; ZeRO row shards, as ``Shard(0)`` DTensors over a 1-D
   mesh of the data-parallel group, written by their owners), then CRC32s split across ranks;
4. *commit* (rank 0): ``manifest.json``, rename to ``<tag>``, replace ``latest``; then every rank
   learns the outcome, so an error anywhere is raised everywhere.

Steps 3–4 of an asynchronous save run on a background thread with its own gloo process group, so
that its collectives never interleave with training's. The next save, a load, or
:meth:`Checkpointer.wait` waits for it; a failure is raised there. The thread is not a daemon:
interpreter exit also waits for the write to finish.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import DeviceMesh

from deepshard.checkpoint import _dist, layout, manifest
from deepshard.checkpoint.deepspeed_load import load_deepspeed_into_engine
from deepshard.checkpoint.load import LoadOptions, load_into_engine
from deepshard.checkpoint.state import Captured, capture, sharded_rows
from deepshard.checkpoint.zero_to_fp32 import write_recovery_script
from deepshard.utils.logging import log_dist


class Checkpointer:
    """Saves and loads one engine's checkpoints; holds the in-flight asynchronous save, if any."""

    def __init__(self, engine: Any) -> None:
        if getattr(engine, "mpu", None) is not None:
            raise ValueError(
                "checkpoints with a model-parallel unit (mpu=...) are not supported yet: ranks of different "
                "model-parallel groups hold different tensors under the same names."
            )
        self.engine = engine
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._pending_path: Path | None = None
        self._async_group: Any = None
        self._meshes: dict[str, DeviceMesh] = {}

    # ------------------------------------------------------------------ save
    def save(
        self,
        save_dir: str | os.PathLike[str],
        tag: str | None = None,
        client_state: dict[str, Any] | None = None,
        save_latest: bool = True,
        exclude_frozen_parameters: bool = False,
        async_save: bool | None = None,
    ) -> str:
        """Collective: write a checkpoint of the engine into ``save_dir/<tag>``; return that path.

        With ``async_save`` the call returns once the state is copied; the write continues in the
        background (see :meth:`wait`). ``None`` uses the config's ``checkpoint.async_save``.
        """
        self.wait()
        if async_save is None:
            async_save = bool(self.engine.config.checkpoint.async_save)
        gas = self.engine.gradient_accumulation_steps()
        if self.engine.micro_steps % gas:
            log_dist(
                f"saving a checkpoint {self.engine.micro_steps % gas} micro-steps into an accumulation window of "
                f"{gas}: the gradients accumulated so far are not saved (as in DeepSpeed); save after step() at "
                "a boundary to resume exactly",
                ranks=[0],
                level=logging.WARNING,
            )
        root = Path(save_dir).absolute()
        my_tag = layout.validate_tag(
            str(tag) if tag is not None else layout.default_tag(self.engine.global_steps)
        )
        agreed_tag, token = _dist.broadcast_object((my_tag, uuid.uuid4().hex[:12]))
        if agreed_tag != my_tag:
            log_dist(
                f"checkpoint tag {my_tag!r} differs from rank 0's {agreed_tag!r}; using rank 0's",
                ranks=None,
                level=logging.WARNING,
            )
        if _dist.rank() == 0:
            root.mkdir(parents=True, exist_ok=True)
            layout.remove_stale(root)
            write_recovery_script(root)  # DeepSpeed's zero_to_fp32.py, next to the tags
        _dist.raise_if_any(None)  # barrier: rank 0 cleaned up before anyone writes
        final = root / agreed_tag
        # offloaded (NVMe) masters, optimizer state and shards are read in for the capture, dropped after
        with self.engine.partition.resident():
            job = _SaveJob(
                root,
                root / f"{agreed_tag}{layout.TMP_MARK}{token}",
                final,
                token,
                save_latest,
                capture(self.engine, client_state, exclude_frozen_parameters),
                self._mesh(),
            )
            if async_save:
                start = time.perf_counter()
                job.captured = job.captured.staged()
                group = self._checkpoint_group()
                job.mesh = self._mesh(async_group=True)  # the staged rows live in host memory
                log_dist(
                    f"checkpoint {final}: staged {job.captured.nbytes / 2**20:.1f} MiB in "
                    f"{time.perf_counter() - start:.2f}s, writing in the background",
                    ranks=[0],
                )
                self._error = None
                self._pending_path = final
                self._thread = threading.Thread(
                    target=self._run_async, args=(job, group), name="deepshard-checkpoint"
                )
                self._thread.start()
            else:
                job.run(None)
        return str(final)

    def _mesh(self, async_group: bool = False) -> DeviceMesh | None:
        """Collective on first use: the 1-D mesh of the data-parallel group that sharded state is placed on.

        ``None`` when nothing is sharded. The asynchronous save's mesh spans its own gloo group over
        host memory (the staged copies); meshes are built once and cached.
        """
        if not sharded_rows(self.engine):
            return None
        key = "async" if async_group else "train"
        if key not in self._meshes:
            if async_group:
                self._meshes[key] = _dist.device_mesh(self._checkpoint_group(), "cpu")
            else:
                self._meshes[key] = _dist.device_mesh(
                    self.engine.dp_group, torch.device(self.engine.device).type
                )
        return self._meshes[key]

    def _checkpoint_group(self) -> Any:
        """A gloo group of all ranks for background saves (created once, collectively)."""
        if self._async_group is None and _dist.initialized():
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def _run_async(self, job: _SaveJob, group: Any) -> None:
        try:
            job.run(group)
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc

    def wait(self) -> None:
        """Block until the in-flight asynchronous save (if any) is on disk; raise its error if it failed."""
        if self._thread is None:
            return
        self._thread.join()
        self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise RuntimeError(
                f"the asynchronous checkpoint save to {self._pending_path} failed: {error}"
            ) from error

    # ------------------------------------------------------------------ load
    def load(
        self,
        load_dir: str | os.PathLike[str],
        tag: str | None = None,
        load_module_strict: bool = True,
        load_optimizer_states: bool = True,
        load_lr_scheduler_states: bool = True,
        load_module_only: bool = False,
    ) -> tuple[str | None, dict[str, Any] | None]:
        """Collective: restore the engine; ``(path, client_state)``, or ``(None, None)`` if there is nothing.

        A DeepSpeed ZeRO-1/2/3 tag directory (``mp_rank_00_model_states.pt``, no manifest) is imported
        (:mod:`.deepspeed_load`).
        """
        self.wait()
        root = Path(load_dir)
        if tag is None:
            tag = layout.read_latest(root)
            if tag is None:
                log_dist(
                    f"no '{layout.LATEST}' file in {root}: nothing to load (pass tag= to load a specific one)",
                    ranks=[0],
                    level=logging.WARNING,
                )
                return None, None
        path = root / str(tag)
        if not path.is_dir():
            log_dist(f"checkpoint {path} does not exist: nothing loaded", ranks=[0], level=logging.WARNING)
            return None, None
        start = time.perf_counter()
        opts = LoadOptions(
            load_module_strict, load_optimizer_states, load_lr_scheduler_states, load_module_only
        )
        with self.engine.partition.resident():  # offloaded state is read in, loaded into, written back
            if layout.is_deepspeed_checkpoint(path):  # written by DeepSpeed: imported (no manifest to verify)
                client_state = load_deepspeed_into_engine(self.engine, path, opts)
            else:
                manifest.verify(path)
                client_state = load_into_engine(self.engine, path, opts, self._mesh())
        log_dist(f"loaded checkpoint {path} in {time.perf_counter() - start:.2f}s", ranks=[0])
        return str(path), client_state


class _SaveJob:
    """Steps 3–4 of one save (see the module docstring); ``run`` is collective over ``group``."""

    def __init__(
        self,
        root: Path,
        tmp: Path,
        final: Path,
        token: str,
        save_latest: bool,
        captured: Captured,
        mesh: DeviceMesh | None,
    ) -> None:
        self.root, self.tmp, self.final, self.token = root, tmp, final, token
        self.save_latest = save_latest
        self.captured = captured
        self.mesh = mesh  # places the captured row shards (see Captured.dcp_state)

    def run(self, group: Any) -> None:
        start = time.perf_counter()
        rank = _dist.rank(group)
        error = None
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            torch.save(self.captured.rank_state, self.tmp / layout.rank_file(rank))
            if rank == 0:
                torch.save(self.captured.engine_state, self.tmp / layout.ENGINE_STATE)
        except OSError as exc:
            error = f"rank {rank} could not write into {self.tmp}: {exc}"
        _dist.raise_if_any(error, group)
        with _dist.quiet_single_process():
            dcp.save(
                self.captured.dcp_state(self.mesh),
                storage_writer=dcp.FileSystemWriter(str(self.tmp), sync_files=True),
                process_group=group,
                no_dist=not _dist.initialized(),
            )
        files = manifest.checksum_files(self.tmp, group)
        error = None
        if rank == 0:
            try:
                info = {
                    "tag": self.final.name,
                    "world_size": _dist.world_size(group),
                    "counters": self.captured.engine_state["counters"],
                }
                manifest.write_manifest(self.tmp, files, info)
                layout.commit(self.tmp, self.final, self.token)
                if self.save_latest:
                    layout.write_text_atomic(self.root / layout.LATEST, self.final.name)
            except OSError as exc:
                error = f"committing checkpoint {self.final} failed: {exc}"
        _dist.raise_if_any(error, group)
        size = sum(f["bytes"] for f in files.values())
        log_dist(
            f"saved checkpoint {self.final} ({size / 2**20:.1f} MiB) in {time.perf_counter() - start:.2f}s",
            ranks=[0],
        )
