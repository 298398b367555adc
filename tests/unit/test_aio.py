"""The NVMe tier's IO engine: round trips, alignment, short transfers, concurrency, errors, cleanup."""

from __future__ import annotations

import errno
import gc
import os
from pathlib import Path

import pytest
import torch

from deepshard.offload import aio
from deepshard.offload.aio import AIOError, AsyncIO, SwapFiles, aligned_empty, check_nvme_path


def test_aligned_empty_is_page_aligned_and_outlives_its_mapping():
    tensors = [aligned_empty(n) for n in (1, 4095, 4096, 10_000, 1 << 20)]
    gc.collect()
    for t in tensors:
        assert t.data_ptr() % aio.ALIGN == 0 and t.numel() % aio.ALIGN == 0
        t.fill_(7)  # the memory is still mapped after the mmap object went out of scope
        assert int(t.sum()) == 7 * t.numel()


@pytest.mark.parametrize("direct,sync", [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_round_trip(direct, sync, dtype, tmp_path):
    engine = AsyncIO(block_size=8192, queue_depth=3, thread_count=2)
    files = SwapFiles(tmp_path, engine=engine, direct=direct, sync=sync)
    try:
        for key, nbytes in (("a", 4096), ("b", 3 * 8192 + 4096), ("c", 1 << 20)):
            files.slot(key, nbytes)
            src = aligned_empty(nbytes).view(dtype)
            src.copy_(torch.randn(src.numel()).to(dtype) if dtype.is_floating_point else torch.randint(0, 255, (src.numel(),), dtype=dtype))
            files.write(key, src).result()
            dst = aligned_empty(nbytes).view(dtype)
            files.read(key, dst).result()
            assert torch.equal(src, dst)
        assert files.engine.bytes_written == files.engine.bytes_read == 4096 + 3 * 8192 + 4096 + (1 << 20)
    finally:
        files.close()


def test_o_direct_needs_aligned_tensors(tmp_path):
    files = SwapFiles(tmp_path)
    try:
        if not files.direct:
            pytest.skip("this filesystem refuses O_DIRECT")
        files.slot("x", 8192)
        with pytest.raises(ValueError, match="must be page-aligned"):
            files.write("x", torch.zeros(100, dtype=torch.uint8))
    finally:
        files.close()


def test_short_transfers_are_completed(tmp_path, monkeypatch):
    real_pread, real_pwrite = os.preadv, os.pwritev
    calls = {"read": 0, "write": 0}

    def short_pread(fd, buffers, offset):  # at most 1000 bytes per call
        calls["read"] += 1
        return real_pread(fd, [buffers[0][:1000]], offset)

    def short_pwrite(fd, buffers, offset):
        calls["write"] += 1
        return real_pwrite(fd, [buffers[0][:1000]], offset)

    monkeypatch.setattr(aio.os, "preadv", short_pread)
    monkeypatch.setattr(aio.os, "pwritev", short_pwrite)
    engine = AsyncIO(block_size=4096)
    with open(tmp_path / "f", "w+b") as f:
        src = torch.arange(3000, dtype=torch.int32)
        engine.write(f.fileno(), 0, src).result()
        dst = torch.zeros_like(src)
        engine.read(f.fileno(), 0, dst).result()
    engine.close()
    assert torch.equal(src, dst) and calls["read"] >= 12 and calls["write"] >= 12


def test_reading_past_the_end_names_the_file(tmp_path):
    engine = AsyncIO()
    with open(tmp_path / "short.bin", "w+b") as f:
        f.write(b"x" * 100)
        f.flush()
        with pytest.raises(AIOError, match=r"read at offset 100 of .*short.bin hit the end of the file"):
            engine.read(f.fileno(), 0, torch.zeros(200, dtype=torch.uint8), name=f.name).result()
    engine.close()


def test_io_errors_propagate_with_file_and_offset(tmp_path, monkeypatch):
    files = SwapFiles(tmp_path, engine=AsyncIO(block_size=4096, thread_count=2))
    files.slot("w", 3 * 4096)

    def full_disk(fd, buffers, offset):
        if offset >= 4096:
            raise OSError(errno.ENOSPC, "No space left on device")
        return len(buffers[0])

    monkeypatch.setattr(aio.os, "pwritev", full_disk)
    future = files.write("w", aligned_empty(3 * 4096))
    with pytest.raises(AIOError, match=r"write of 4096 bytes at offset (4096|8192) of .*w\.swp failed: No space"):
        future.result()
    files.close()


def test_concurrent_requests(tmp_path):
    files = SwapFiles(tmp_path, engine=AsyncIO(block_size=4096, queue_depth=4, thread_count=4))
    try:
        sources = {}
        for i in range(24):
            files.slot(f"t{i}", 5 * 4096)
            sources[f"t{i}"] = aligned_empty(5 * 4096).view(torch.int32).fill_(i)
        writes = [files.write(k, v) for k, v in sources.items()]
        for w in writes:
            w.result()
        targets = {k: aligned_empty(5 * 4096).view(torch.int32) for k in sources}
        reads = [files.read(k, targets[k]) for k in sources]
        for r in reads:
            r.result()
        assert all(torch.equal(targets[k], sources[k]) for k in sources)
    finally:
        files.close()


def test_files_are_removed_on_close(tmp_path):
    files = SwapFiles(tmp_path)
    files.slot("a", 10)
    directory = files.dir
    assert any(directory.iterdir())
    files.close()
    assert not directory.exists() and list(Path(tmp_path).iterdir()) == []


def test_bad_nvme_paths(tmp_path, monkeypatch):
    assert check_nvme_path(tmp_path / "missing" / "sub", 0).is_dir()  # created, as DeepSpeed does
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a directory"):
        check_nvme_path(tmp_path / "file", 0)
    with pytest.raises(ValueError, match=r"does not exist and could not be created \(Not a directory\)"):
        check_nvme_path(tmp_path / "file" / "sub", 0)
    with pytest.raises(ValueError, match=r"GiB free, but offload needs 1024\.00 GiB"):
        check_nvme_path(tmp_path, 1 << 40)
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="is not writable"):
            check_nvme_path(locked, 0)


def test_bad_engine_settings():
    with pytest.raises(ValueError, match="block_size must be a positive multiple of 4096"):
        AsyncIO(block_size=1000)
    with pytest.raises(ValueError, match="queue_depth and thread_count must be positive"):
        AsyncIO(queue_depth=0)
