"""Batches that know which training examples they hold.

A cached teacher reads its outputs by example position in the training set, so the
runner wraps the training set: each item comes with its index, and the collate
function adds ``example_index`` ([B], int64) to the task's own batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

INDEX_KEY = "example_index"


class IndexedDataset(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[int, Any]:
        return index, self.dataset[index]

    def set_epoch(self, epoch: int) -> None:
        """Passed on to a dataset whose examples change with the epoch (fresh generations)."""
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def indexed_collate(
    collate: Callable[[list[Any]], dict[str, Any]],
) -> Callable[[list[tuple[int, Any]]], dict[str, Any]]:
    def collate_with_index(items: list[tuple[int, Any]]) -> dict[str, Any]:
        batch = collate([item for _, item in items])
        batch[INDEX_KEY] = torch.tensor([index for index, _ in items], dtype=torch.long)
        return batch

    return collate_with_index
