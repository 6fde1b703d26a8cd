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
from kdforge.data.table import SourceFields, read_table, seeded_split, table_columns
from kdforge.data.table import data_files as table_files
from kdforge.errors import DataError
from kdforge.settings import data_dir
from kdforge.tasks.base import MOVED_TO_METHODS, Splits, refuse_moved_settings


class FeatureData(SourceFields):
    """Feature vectors: digits, MNIST or an .npz (``dataset``), or any table's numeric columns (``source``/``files``:
    the ``label`` column, and ``feature_columns`` or every other numeric column as the features)."""

    columns: dict[str, str | list[str]] = Field(
        {}, description="which column holds each role: label (the features: feature_columns), e.g. {label: y}"
    )

    dataset: Literal["digits", "mnist", "npz"] = Field(
        "digits", description="digits (scikit-learn), mnist (KDFORGE_DATA_DIR/mnist, 10,000 images), or npz"
    )
    path: str | None = Field(None, description="the .npz file (X, y) when dataset is npz")
    test_fraction: float = Field(0.25, gt=0, lt=1)
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    split_seed: int = 0
    train_limit: int | None = Field(None, ge=1, description="use only the first N training examples")
    feature_columns: list[str] | None = Field(
        None, description="source/files: the feature columns, in order; default every numeric column but the label"
    )

    _moved = model_validator(mode="before")(lambda data: refuse_moved_settings(data, MOVED_TO_METHODS))

    @model_validator(mode="after")
    def _one_source(self) -> FeatureData:
        table = self.source is not None or self.files is not None
        if table and {"dataset", "path"} & self.model_fields_set:
            raise ValueError("data: give either dataset (digits, mnist, npz with path) or source and files, not both")
        if self.feature_columns is not None and not table:
            raise ValueError("data.feature_columns: names columns of source/files; give those too")
        return self

    @property
    def from_table(self) -> bool:
        return self.source is not None or self.files is not None

    def check_files(self) -> None:
        if self.from_table:
            super().check_files()
        elif self.dataset == "mnist":
            from kdforge.data.paths import resolve_data_path

            for name in (MNIST_IMAGES, MNIST_LABELS):
                resolve_data_path(f"mnist/{name}", "data.dataset")
        elif self.dataset == "npz":
            if self.path is None:
                raise DataError("data.path: an npz dataset needs a path to a file with arrays X and y")
            from kdforge.data.paths import resolve_data_path

            resolve_data_path(self.path, "data.path")


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
    def _read(self) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Features [N, F], class indices [N], and the rows of each split the data gives (tables only)."""
        if not self.cfg.from_table:
            features, labels = load_arrays(self.cfg.dataset, self.cfg.path)
            return features, labels, {}
        return read_feature_table(self.cfg)

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self._read[0], self._read[1]

    @property
    def num_classes(self) -> int:
        return int(self.arrays[1].max()) + 1

    @property
    def in_features(self) -> int:
        return int(self.arrays[0].shape[1])

    def splits(self) -> Splits:
        features, labels = self.arrays
        cfg = self.cfg
        given = self._read[2]
        if "test" in given:  # the data's own test (and validation) split; a validation share of train otherwise
            train_idx, val_idx, test_idx = given["train"], given.get("validation"), given["test"]
            if val_idx is None:
                val_idx = np.array([], dtype=np.int64)
                if cfg.validation_fraction > 0:
                    keep, held = seeded_split(len(train_idx), cfg.validation_fraction, cfg.split_seed)
                    train_idx, val_idx = train_idx[keep], train_idx[held]
        else:
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
        if self.cfg.from_table:
            return table_files(self.cfg)
        if self.cfg.dataset == "mnist":  # a teacher cache's fingerprint covers the images it was made of
            return [data_dir() / "mnist" / MNIST_IMAGES, data_dir() / "mnist" / MNIST_LABELS]
        return [Path(self.cfg.path)] if self.cfg.dataset == "npz" and self.cfg.path else []

    def train_sampler(self, seed: int) -> Sampler[int] | None:
        return None

    def training_info(self, steps: int) -> dict[str, Any]:
        return {}


def read_feature_table(cfg: FeatureData) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A table's feature columns as float32 [N, F] and its labels as class indices (sorted names), every
    split one after another, with each split's rows."""
    label = cfg.columns.get("label", "label")
    present = table_columns(cfg)
    names = cfg.feature_columns or [c for c in present if c != label]
    roles = {"label": True, **{name: True for name in names}}
    columns = {**cfg.columns, **{name: name for name in names}}
    table = read_table(cfg.model_copy(update={"columns": columns}), roles)
    rows, labels, given, start = [], [], {}, 0
    for split, values in table.splits.items():
        try:
            block = np.column_stack([np.asarray(values[name], dtype=np.float32) for name in names])
        except (TypeError, ValueError):
            bad = next(n for n in names if not all(isinstance(v, (int, float)) for v in values[n]))
            raise DataError(
                f"data.feature_columns: column {bad!r} of the {split} split is not numeric; list the numeric"
                " columns in data.feature_columns"
            ) from None
        rows.append(block)
        labels += values["label"]
        given[split] = np.arange(start, start + len(block))
        start += len(block)
    kinds = {type(v) for v in labels}
    if len(kinds) > 1:
        raise DataError(
            f"data.columns.label: {table.name} mixes label types"
            f" ({', '.join(sorted(k.__name__ for k in kinds))}); use one kind"
        )
    classes = sorted(set(labels))
    index = {c: i for i, c in enumerate(classes)}
    return np.concatenate(rows), np.array([index[v] for v in labels], dtype=np.int64), given
