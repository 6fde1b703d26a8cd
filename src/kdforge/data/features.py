"""Feature-vector classification data: scikit-learn's digits, MNIST, or your own .npz.

Digits (1,797 8x8 images, 10 classes) ships inside scikit-learn, so it needs no
download. MNIST is read from ``KDFORGE_DATA_DIR/mnist``: the 10,000-image test set
in LeCun's idx format (``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``),
as pixels / 255 in [10000, 784]. An ``.npz`` file needs arrays ``X`` ([N, F] floats)
and ``y`` ([N] ints).
"""

from __future__ import annotations

import functools
import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from kdforge.errors import DataError, RecipeError
from kdforge.settings import data_dir

#: the MNIST files kdforge reads, under KDFORGE_DATA_DIR/mnist
MNIST_IMAGES = "t10k-images-idx3-ubyte.gz"
MNIST_LABELS = "t10k-labels-idx1-ubyte.gz"
#: idx magic numbers: two zero bytes, the type code 0x08 (unsigned byte), the number of dimensions
_IDX_MAGIC = {1: 0x00000801, 3: 0x00000803}


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
    if dataset == "mnist":
        return load_mnist(data_dir() / "mnist")
    if path is None:
        raise RecipeError("data.path: an npz dataset needs a path to a file with arrays X and y")
    file = Path(path).expanduser()
    if not file.is_file():
        raise RecipeError(f"data.path: {path} does not exist")
    try:
        with np.load(file, allow_pickle=False) as arrays:
            features, labels = arrays["X"], arrays["y"]
    except (KeyError, ValueError, OSError, EOFError) as exc:  # an empty file: EOFError, which click takes for ^D
        raise RecipeError(f"data.path: {path} is not an .npz file with arrays X and y ({exc})") from None
    if features.ndim != 2 or labels.ndim != 1 or len(features) != len(labels):
        raise RecipeError(f"data.path: X must be [N, F] and y [N]; got {features.shape} and {labels.shape}")
    return features.astype(np.float32), labels.astype(np.int64)


def load_mnist(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """MNIST's test set from ``folder``: pixels / 255 as float32 [N, 784] and labels int64 [N].

    Parsed once per process and folder (a benchmark runs many recipes in one process);
    each caller gets its own copy, so no caller can alter another's data.
    """
    features, labels = _load_mnist_cached(Path(folder).expanduser().resolve())
    return features.copy(), labels.copy()


@functools.lru_cache(maxsize=4)
def _load_mnist_cached(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    images = _read_idx(folder / MNIST_IMAGES, dims=3)
    labels = _read_idx(folder / MNIST_LABELS, dims=1)
    if len(images) != len(labels):
        raise DataError(
            f"data.dataset: {folder} holds {len(images)} MNIST images but {len(labels)} labels;"
            " replace both files with a matching pair"
        )
    if labels.size and labels.max() > 9:
        raise DataError(f"data.dataset: {folder / MNIST_LABELS} has labels above 9; the file is not MNIST labels")
    return images.reshape(len(images), -1).astype(np.float32) / 255.0, labels.astype(np.int64)


def _read_idx(file: Path, dims: int) -> np.ndarray:
    """One idx file (big-endian header: magic, then one uint32 per dimension, then unsigned bytes)."""
    if not file.is_file():
        raise DataError(
            f"data.dataset: MNIST needs {file}, which does not exist; put {MNIST_IMAGES} and {MNIST_LABELS}"
            " in a folder named mnist under KDFORGE_DATA_DIR (now "
            f"{data_dir()}) or set KDFORGE_DATA_DIR to the folder that holds mnist/"
        )
    try:
        raw = gzip.decompress(file.read_bytes())
    except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError
        raise DataError(f"data.dataset: {file} is not a readable gzip file ({exc}); download it again") from None
    header = 4 * (1 + dims)
    if len(raw) < header:
        raise DataError(f"data.dataset: {file} is too short to be an idx file; download it again")
    magic, *shape = np.frombuffer(raw, dtype=">u4", count=1 + dims).tolist()
    if magic != _IDX_MAGIC[dims]:
        raise DataError(
            f"data.dataset: {file} starts with magic number {magic:#010x}, expected {_IDX_MAGIC[dims]:#010x}"
            f" (an idx file of unsigned bytes with {dims} dimension(s)); is it the right file?"
        )
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(
            f"data.dataset: {file} should hold {expected} bytes after its header for shape {tuple(shape)},"
            f" but holds {len(raw) - header}; the file is truncated or corrupt, download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


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
