"""A shuffling sampler whose order depends only on (seed, epoch), and the per-process
shares of its global batches.

Resuming mid-epoch regenerates the same order and skips the batches already
seen, so a resumed run sees exactly the data an uninterrupted run would, on any
number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from kdforge.distributed import share_bounds


class EpochShuffleSampler(Sampler[int]):
    def __init__(self, length: int, seed: int, shuffle: bool = True):
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        if not self.shuffle:
            return iter(range(self.length))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class ProcessShareBatches(Sampler[list]):
    """Global batches of ``batch_size`` from ``sampler``, each cut into ``world`` contiguous shares;
    yields this process's share as ``(index, counted)`` pairs.

    Every process walks the same global order (the sampler depends only on its seed and
    epoch), so the shares hold each example exactly once: none duplicated, none dropped,
    the last, shorter batch included. A share can be empty only when a batch has fewer
    examples than there are processes; that process then gets the batch's first example
    with ``counted`` False, a stand-in that adds nothing to the loss, because every process
    takes part in each step's exchanges (counts, gathered rows, the gradient average).

    With ``world == 1`` the batches are the sampler's, as before.
    """

    def __init__(self, sampler: Sampler[int], batch_size: int, rank: int = 0, world: int = 1):
        self.sampler, self.batch_size, self.rank, self.world = sampler, batch_size, rank, world

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        batch: list[int] = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield self._share(batch)
                batch = []
        if batch:
            yield self._share(batch)

    def _share(self, batch: list[int]) -> list[tuple[int, bool]]:
        start, stop = share_bounds(len(batch), self.rank, self.world)
        return [(i, True) for i in batch[start:stop]] or [(batch[0], False)]

    def __len__(self) -> int:
        return -(-len(self.sampler) // self.batch_size)  # type: ignore[arg-type]
