"""Feature-vector classification data: scikit-learn's bundled digits, or your own .npz.

Digits (1,797 8x8 images, 10 classes) ships inside scikit-learn, so it needs no
download. An ``.npz`` file needs arrays ``X`` ([N, F] floats) and ``y`` ([N] ints).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kdforge.errors import RecipeError


class FeatureDataset(Dataset):
    def __init__(self, features: np.ndarray, labels: np.ndarray):
        self.features = torch.as_tensor(features, dtype=torch.float32)
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.features[i], "labels": self.labels[i]}


def load_arrays(dataset: str, path: str | None) -> tuple[np.ndarray, np.ndarray]:
    if dataset == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.data.astype(np.float32) / 16.0, digits.target.astype(np.int64)
    if path is None:
        raise RecipeError("data.path: an npz dataset needs a path to a file with arrays X and y")
    file = Path(path).expanduser()
    if not file.is_file():
        raise RecipeError(f"data.path: {path} does not exist")
    try:
        with np.load(file, allow_pickle=False) as arrays:
            features, labels = arrays["X"], arrays["y"]
    except (KeyError, ValueError, OSError) as exc:
        raise RecipeError(f"data.path: {path} is not an .npz file with arrays X and y ({exc})") from None
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise RecipeError(f"data.path: X must be [N, F] and y [N]; got {features.shape} and {labels.shape}")
    return features.astype(np.float32), labels.astype(np.int64)


def split_indices(n: int, labels: np.ndarray, test: float, validation: float, seed: int):
    """Stratified train / validation / test indices, the same for every run with the same seed."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n)
    train_val, test_idx = train_test_split(idx, test_size=test, random_state=seed, stratify=labels)
    if validation <= 0:
        return train_val, np.array([], dtype=np.int64), test_idx
    share = validation / (1.0 - test)
    train_idx, val_idx = train_test_split(train_val, test_size=share, random_state=seed, stratify=labels[train_val])
    return train_idx, val_idx, test_idx
