"""Offload tiers under the shard: host memory and NVMe (see DESIGN §3, "Offload is a tier under the shard").

:mod:`deepshard.offload.aio` is the NVMe tier's IO engine: aligned buffers, background threads,
``O_DIRECT`` where the filesystem allows it.
"""

from deepshard.offload.aio import AIOError, AsyncIO, SwapFiles, aligned_empty, check_nvme_path

__all__ = ["AIOError", "AsyncIO", "SwapFiles", "aligned_empty", "check_nvme_path"]
