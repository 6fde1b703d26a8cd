"""The feature-table data source of ``classification``: feature vectors and their classes.

:class:`FeatureTable` (a :class:`~kdforge.tasks.parts.DataSource`) reads scikit-learn's
digits, MNIST (``KDFORGE_DATA_DIR/mnist``) or an ``.npz`` of ``X`` and ``y``, splits it
stratified by ``split_seed`` into train, validation (when ``validation_fraction`` > 0)
and test, and batches examples as ``{"inputs": [B, F], "labels": [B]}``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch.utils.data import Dataset, Sampler, Subset

from kdforge.data.features import MNIST_IMAGES, MNIST_LABELS, FeatureDataset, load_arrays, split_indices
from kdforge.recipe import Strict
from kdforge.settings import data_dir
from kdforge.tasks.base import MOVED_TO_METHODS, Splits, refuse_moved_settings


class FeatureData(Strict):
    dataset: Literal["digits", "mnist", "npz"] = Field(
        "digits", description="digits (scikit-learn), mnist (KDFORGE_DATA_DIR/mnist, 10,000 images), or npz"
    )
    path: str | None = Field(None, description="the .npz file (X, y) when dataset is npz")
    test_fraction: float = Field(0.25, gt=0, lt=1)
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    split_seed: int = 0
    train_limit: int | None = Field(None, ge=1, description="use only the first N training examples")

    _moved = model_validator(mode="before")(lambda data: refuse_moved_settings(data, MOVED_TO_METHODS))


def collate_features(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {
        "inputs": torch.stack([it["inputs"] for it in items]),
        "labels": torch.stack([it["labels"] for it in items]),
    }


class FeatureTable:
    """Feature vectors with class labels, split train / validation / test (see the module)."""

    def __init__(self, cfg: FeatureData):
        self.cfg = cfg

    @cached_property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return load_arrays(self.cfg.dataset, self.cfg.path)

    @property
    def num_classes(self) -> int:
        return int(self.arrays[1].max()) + 1

    @property
    def in_features(self) -> int:
        return int(self.arrays[0].shape[1])

    def splits(self) -> Splits:
        features, labels = self.arrays
        cfg = self.cfg
        train_idx, val_idx, test_idx = split_indices(
            len(labels), labels, cfg.test_fraction, cfg.validation_fraction, cfg.split_seed
        )
        if cfg.train_limit is not None:
            train_idx = train_idx[: cfg.train_limit]
        full = FeatureDataset(features, labels)
        test = Subset(full, test_idx.tolist())
        if len(val_idx):
            return Splits(Subset(full, train_idx.tolist()), Subset(full, val_idx.tolist()), test, "validation")
        return Splits(Subset(full, train_idx.tolist()), test, test, "test")

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return collate_features(items)

    def labels(self, dataset: Dataset) -> np.ndarray:
        """The class of each example of ``dataset``, in its order (what the evaluator scores against)."""
        return torch.stack([dataset[i]["labels"] for i in range(len(dataset))]).numpy()

    def data_files(self) -> list[Path]:
        if self.cfg.dataset == "mnist":  # a teacher cache's fingerprint covers the images it was made of
            return [data_dir() / "mnist" / MNIST_IMAGES, data_dir() / "mnist" / MNIST_LABELS]
        return [Path(self.cfg.path)] if self.cfg.dataset == "npz" and self.cfg.path else []

    def train_sampler(self, seed: int) -> Sampler[int] | None:
        return None

    def training_info(self, steps: int) -> dict[str, Any]:
        return {}
