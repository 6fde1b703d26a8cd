"""Readers of the labelled text-classification sets: SST-2, TREC (coarse or fine labels), emotion.

Each gives texts and class names per split. Folders are looked up in
``KDFORGE_DATA_DIR`` (see ../shared/data/README.md for their layouts):

- ``sst2/{train,dev,test}.tsv``: header, then ``label<TAB>sentence`` (0 negative, 1 positive);
- ``trec/train_5500.label``, ``trec/TREC_10.label``: ``COARSE:fine question`` per line;
- ``emotion/{train,val,test}.txt``: header ``text;label_name``, then ``text;label``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kdforge.data.paths import resolve_data_path
from kdforge.errors import DataError

DatasetName = Literal["sst2", "trec", "emotion"]
SST2_NAMES = {"0": "negative", "1": "positive"}
#: the files of each split; None: the set has no such split (a validation share of train is held out)
FILES: dict[str, dict[str, str | None]] = {
    "sst2": {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"},
    "trec": {"train": "train_5500.label", "validation": None, "test": "TREC_10.label"},
    "emotion": {"train": "train.txt", "validation": "val.txt", "test": "test.txt"},
}


@dataclass(frozen=True)
class LabelledText:
    """One training or validation example; ``source`` says where it came from ("train", "teacher round 2")."""

    text: str
    label: int
    source: str = "train"


#: what one line of each set holds, for the error that names a line that does not
LINE_FORMATS = {"sst2": "label<TAB>sentence", "trec": "COARSE:fine question", "emotion": "text;label"}


@dataclass
class LabelledTexts:
    texts: list[str]
    labels: list[str]  # class names, not indices: splits agree on names, indices come later


def _read(file: Path, dataset: str, trec_labels: str) -> LabelledTexts:
    texts, labels = [], []
    with file.open(encoding="utf-8", errors="replace") as handle:
        lines = handle.read().splitlines()
    if dataset in ("sst2", "emotion"):
        lines = lines[1:]  # header
    for number, line in enumerate(lines, 2 if dataset != "trec" else 1):
        if not line.strip():
            continue
        if dataset == "sst2":
            label, sep, text = line.partition("\t")
            label = SST2_NAMES.get(label.strip(), "")
        elif dataset == "emotion":
            text, sep, label = line.rpartition(";")
        else:
            label, sep, text = line.partition(" ")
            coarse, _, fine = label.partition(":")
            label = coarse if trec_labels == "coarse" else label
            sep = sep if fine else ""
        if not sep or not label or not text.strip():
            raise DataError(
                f"data.dataset: {file}:{number} is not a {dataset} line: {line[:80]!r}; each line holds"
                f" {LINE_FORMATS[dataset]}: fix the file, or point data.path at a {dataset} folder"
            )
        texts.append(text.strip())
        labels.append(label.strip())
    if not texts:
        raise DataError(f"data.dataset: {file} holds no examples")
    return LabelledTexts(texts, labels)


def load_split(
    dataset: str, split: str, *, path: str | None = None, trec_labels: str = "coarse"
) -> LabelledTexts | None:
    """One split (train, validation or test) of ``dataset``; None where the set has no such file."""
    name = FILES[dataset][split]
    if name is None:
        return None
    root = resolve_data_path(path or dataset, "data.path")
    file = root / name
    if not file.is_file():
        raise DataError(f"data.path: {file} is missing; point data.path (or KDFORGE_DATA_DIR) at a {dataset} folder")
    return _read(file, dataset, trec_labels)


def data_files(dataset: str, path: str | None = None) -> list[Path]:
    root = resolve_data_path(path or dataset, "data.path")
    return [root / name for name in FILES[dataset].values() if name is not None]
