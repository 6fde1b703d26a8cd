"""The labelled-texts data source of ``text_classification``: SST-2, TREC and emotion.

:class:`LabelledTextSource` (a :class:`~kdforge.tasks.parts.DataSource`) reads a dataset's
train, validation and test files (:mod:`kdforge.data.text_classification`), holds a
validation share out of train where the set has none (the same for every run with one
``split_seed``), applies the limits, names the classes (sorted, from the training
examples) and batches texts with the family's tokenizer. It also gives what the
``labelled_texts`` capability promises (PGKD adds to the training texts): the examples of
a dataset, a dataset of examples, and what the classes mean in one sentence.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch.utils.data import Dataset, Sampler

from kdforge.data.text_classification import DatasetName, LabelledText, LabelledTexts, data_files, load_split
from kdforge.errors import RecipeError
from kdforge.objective import FIELD_MASKS
from kdforge.recipe import Strict
from kdforge.tasks.base import MOVED_TO_METHODS, Splits, refuse_moved_settings
from kdforge.tasks.encoders import field_masks

#: what the classes of each dataset mean, for a generative teacher's prompt
DESCRIPTIONS = {
    "sst2": "Classify the sentiment of movie-review sentences as negative or positive.",
    "trec": "Classify questions by the type of their answer: ABBR abbreviation, DESC description, ENTY entity,"
    " HUM human, LOC location, NUM numeric value.",
    "emotion": "Classify the emotion expressed in short English tweets.",
}


class TextClassData(Strict):
    dataset: DatasetName = Field(..., description="sst2, trec or emotion (folders under KDFORGE_DATA_DIR)")
    path: str | None = Field(None, description="the dataset's folder, when not KDFORGE_DATA_DIR/<dataset>")
    trec_labels: Literal["coarse", "fine"] = Field("coarse", description="TREC's 6 coarse or 50 fine classes")
    max_length: int = Field(64, ge=8, description="tokens kept per text")
    train_limit: int | None = Field(None, ge=1, description="a random subset of N training examples (split_seed)")
    validation_limit: int | None = Field(None, ge=1, description="the first N validation examples only")
    test_limit: int | None = Field(None, ge=1, description="the first N test examples only")
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of train held out for validation where the set has no validation file"
    )
    split_seed: int = 0

    _moved = model_validator(mode="before")(lambda data: refuse_moved_settings(data, MOVED_TO_METHODS))


class LabelledSet(Dataset):
    def __init__(self, texts: list[str], labels: list[int]):
        self.texts = texts
        self.labels = labels

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"text": self.texts[index], "label": self.labels[index]}


#: a family's tokenization of texts: input_ids, attention_mask (and token_type_ids), padded
Tokens = Callable[[list[str]], dict[str, torch.Tensor]]


class LabelledTextSource:
    """Labelled texts, split and limited as ``data`` says, batched with ``tokens`` (see the module)."""

    def __init__(self, cfg: TextClassData, tokens: Tokens):
        self.cfg = cfg
        self.tokens = tokens

    def _split(self, split: str) -> LabelledTexts | None:
        cfg = self.cfg
        return load_split(cfg.dataset, split, path=cfg.path, trec_labels=cfg.trec_labels)

    @cached_property
    def sets(self) -> tuple[LabelledTexts, LabelledTexts, LabelledTexts]:
        """Train, validation and test, with class names (not yet indices)."""
        cfg = self.cfg
        train, validation, test = self._split("train"), self._split("validation"), self._split("test")
        assert train is not None and test is not None
        rng = np.random.default_rng(cfg.split_seed)
        if validation is None:  # held out of train, the same for every run with this split_seed
            order = rng.permutation(len(train.texts))
            cut = max(1, round(len(order) * cfg.validation_fraction))
            validation = _take(train, order[:cut])
            train = _take(train, np.sort(order[cut:]))
        if cfg.train_limit is not None and cfg.train_limit < len(train.texts):
            train = _take(train, np.sort(rng.permutation(len(train.texts))[: cfg.train_limit]))
        if cfg.validation_limit is not None:
            validation = _take(validation, np.arange(min(cfg.validation_limit, len(validation.texts))))
        if cfg.test_limit is not None:
            test = _take(test, np.arange(min(cfg.test_limit, len(test.texts))))
        return train, validation, test

    @cached_property
    def class_names(self) -> list[str]:
        train, validation, test = self.sets
        names = sorted(set(train.labels))
        unknown = sorted((set(validation.labels) | set(test.labels)) - set(names))
        if unknown:
            raise RecipeError(
                f"data.train_limit: the training examples have no {', '.join(unknown[:5])} (classes of the"
                " evaluation sets); use more training data"
            )
        return names

    def _labelled(self, part: LabelledTexts) -> LabelledSet:
        index = {name: i for i, name in enumerate(self.class_names)}
        return LabelledSet(part.texts, [index[name] for name in part.labels])

    def splits(self) -> Splits:
        train, validation, test = self.sets
        return Splits(self._labelled(train), self._labelled(validation), self._labelled(test), "validation")

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = self.tokens([item["text"] for item in items])
        batch["labels"] = torch.tensor([item["label"] for item in items], dtype=torch.long)
        batch["token_mask"] = batch["attention_mask"].bool()
        batch[FIELD_MASKS] = field_masks()
        return batch

    def labels(self, dataset: Dataset) -> np.ndarray:
        """The class index of each example of ``dataset``, in its order (what the evaluator scores against)."""
        return np.array([dataset[i]["label"] for i in range(len(dataset))])

    def data_files(self) -> list[Path]:
        return data_files(self.cfg.dataset, self.cfg.path)

    def train_sampler(self, seed: int) -> Sampler[int] | None:
        return None

    def training_info(self, steps: int) -> dict[str, Any]:
        return {}

    # ---- what the labelled_texts capability gives (PGKD) ------------------------------------
    def labelled_texts(self, dataset: Dataset) -> list[LabelledText]:
        return [
            LabelledText(item["text"], item["label"], "train") for item in (dataset[i] for i in range(len(dataset)))
        ]

    def dataset_of(self, examples: list[LabelledText]) -> Dataset:
        return LabelledSet([e.text for e in examples], [e.label for e in examples])

    def task_description(self) -> str:
        """What the classes mean, in one sentence (a generative teacher's prompt)."""
        return DESCRIPTIONS[self.cfg.dataset]


def _take(part: LabelledTexts, index: np.ndarray) -> LabelledTexts:
    return LabelledTexts([part.texts[i] for i in index], [part.labels[i] for i in index])
