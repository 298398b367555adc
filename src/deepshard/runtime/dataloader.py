"""The data-parallel dataloader that ``initialize(training_data=...)`` and ``engine.deepspeed_io`` build.

Each rank reads a disjoint ``1/world`` slice of the dataset through ``DistributedSampler`` with
micro-batches of ``train_micro_batch_size_per_gpu``. The epoch advances automatically each time the
loader is iterated again, so shuffling differs per epoch without a ``set_epoch`` call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class DeepShardDataLoader:
    """A ``DataLoader`` over this rank's share of ``dataset``.

    ``len()`` is the number of micro-batches per epoch on this rank. ``epoch`` counts completed passes.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int,
        rank: int,
        world_size: int,
        collate_fn: Callable[..., Any] | None = None,
        drop_last: bool = False,
        num_workers: int = 0,
        pin_memory: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        data_sampler: Sampler[Any] | None = None,
    ) -> None:
        self.sampler: Sampler[Any] = data_sampler or DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            collate_fn=collate_fn,
            drop_last=drop_last,
            num_workers=num_workers,
            pin_memory=pin_memory,
        )
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(self.epoch)
        yield from self.loader
        self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        """The loader's position (the epoch); used by checkpoints."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.epoch = int(state["epoch"])
