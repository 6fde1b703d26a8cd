"""MNIST as feature vectors: the idx reader, its errors, and the fixed train/test split."""

import gzip
import re
import struct

import numpy as np
import pytest

from conftest import SHARED_DATA
from kdforge.checks import parse_recipe
from kdforge.data.features import MNIST_IMAGES, MNIST_LABELS, load_arrays, load_mnist, split_indices
from kdforge.errors import RecipeError

MNIST = SHARED_DATA / "mnist"
needs_mnist = pytest.mark.skipif(
    not (MNIST / MNIST_IMAGES).is_file(), reason=f"MNIST is not at {MNIST} (set KDFORGE_DATA_DIR)"
)


def _write_idx(file, magic: int, shape: tuple[int, ...], values: np.ndarray) -> None:
    header = struct.pack(f">{1 + len(shape)}I", magic, *shape)
    file.write_bytes(gzip.compress(header + values.astype(np.uint8).tobytes()))


def _tiny_mnist(folder, n: int = 20):
    """A made-up MNIST folder: n random 28x28 images with labels 0..9 in turn."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 28, 28))
    labels = np.arange(n) % 10
    _write_idx(folder / MNIST_IMAGES, 0x803, (n, 28, 28), images)
    _write_idx(folder / MNIST_LABELS, 0x801, (n,), labels)
    return images, labels


def test_reads_idx_files_as_scaled_pixels(tmp_path):
    images, labels = _tiny_mnist(tmp_path / "mnist")
    features, targets = load_mnist(tmp_path / "mnist")
    assert features.shape == (20, 784) and features.dtype == np.float32
    assert targets.dtype == np.int64
    np.testing.assert_allclose(features, images.reshape(20, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(targets, labels)


def test_each_caller_gets_its_own_arrays(tmp_path):
    _tiny_mnist(tmp_path / "mnist")
    first, _ = load_mnist(tmp_path / "mnist")
    first[:] = -1.0
    second, _ = load_mnist(tmp_path / "mnist")
    assert second.min() >= 0.0


def test_dataset_mnist_is_read_from_kdforge_data_dir(tmp_path, monkeypatch):
    _tiny_mnist(tmp_path / "mnist")
    monkeypatch.setenv("KDFORGE_DATA_DIR", str(tmp_path))
    features, labels = load_arrays("mnist", None)
    assert features.shape == (20, 784) and len(labels) == 20


def test_missing_folder_names_the_path_and_the_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("KDFORGE_DATA_DIR", str(tmp_path))
    with pytest.raises(RecipeError, match=rf"{re.escape(str(tmp_path))}.*mnist.*KDFORGE_DATA_DIR"):
        load_arrays("mnist", None)


def test_missing_labels_file_is_named(tmp_path):
    _tiny_mnist(tmp_path / "mnist")
    (tmp_path / "mnist" / MNIST_LABELS).unlink()
    with pytest.raises(RecipeError, match=MNIST_LABELS):
        load_mnist(tmp_path / "mnist")


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda f: f.write_bytes(b"not gzip at all"), "not a readable gzip"),
        (lambda f: f.write_bytes(gzip.compress(b"\x00\x00")), "too short"),
        (lambda f: f.write_bytes(gzip.compress(struct.pack(">4I", 0x801, 2, 28, 28))), "magic number"),
        (lambda f: f.write_bytes(gzip.compress(struct.pack(">4I", 0x803, 2, 28, 28) + b"\x00" * 10)), "truncated"),
        (lambda f: f.write_bytes(f.read_bytes()[:-8]), "gzip"),
    ],
    ids=["not-gzip", "short", "wrong-magic", "truncated-body", "truncated-gzip"],
)
def test_corrupt_images_file_is_a_recipe_error(tmp_path, corrupt, message):
    _tiny_mnist(tmp_path / "mnist")
    corrupt(tmp_path / "mnist" / MNIST_IMAGES)
    with pytest.raises(RecipeError, match=message):
        load_mnist(tmp_path / "mnist")


def test_images_and_labels_must_match_in_number(tmp_path):
    _tiny_mnist(tmp_path / "mnist")
    _write_idx(tmp_path / "mnist" / MNIST_LABELS, 0x801, (5,), np.arange(5))
    with pytest.raises(RecipeError, match="20 MNIST images but 5 labels"):
        load_mnist(tmp_path / "mnist")


def test_the_recipe_schema_accepts_mnist():
    raw = {
        "name": "m",
        "task": "classification",
        "student": {"hidden": [8]},
        "data": {"dataset": "mnist", "test_fraction": 0.2},
        "objective": [{"loss": "cross_entropy"}],
        "training": {"steps": 1},
    }
    assert parse_recipe(raw).data["dataset"] == "mnist"


# ----- the real test set ------------------------------------------------------------------


@needs_mnist
def test_real_mnist_shapes_range_and_class_counts():
    features, labels = load_mnist(MNIST)
    assert features.shape == (10000, 784) and features.dtype == np.float32
    assert features.min() == 0.0 and features.max() == 1.0
    # LeCun's t10k labels: 980 zeros, 1,135 ones, ...
    assert np.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@needs_mnist
def test_real_mnist_split_is_fixed_by_its_seed():
    _, labels = load_mnist(MNIST)
    train, val, test = split_indices(len(labels), labels, 0.2, 0.0, seed=0)
    again = split_indices(len(labels), labels, 0.2, 0.0, seed=0)
    assert len(train) == 8000 and len(test) == 2000 and len(val) == 0
    np.testing.assert_array_equal(train, again[0])
    np.testing.assert_array_equal(test, again[2])
    assert not set(train) & set(test)
    # stratified: every digit keeps its share of the test set (within one image)
    assert np.abs(np.bincount(labels[test]) - np.bincount(labels) * 0.2).max() <= 1
    other = split_indices(len(labels), labels, 0.2, 0.0, seed=1)
    assert set(other[2]) != set(test)
