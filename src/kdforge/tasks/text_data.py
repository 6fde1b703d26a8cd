"""The labelled-texts data source of ``text_classification``: any labelled text, bundled or the user's.

:class:`LabelledTextSource` (a :class:`~kdforge.tasks.parts.DataSource`) reads the
``text`` (and optional ``text_pair``) and ``label`` columns of any file ``datasets`` reads
(:mod:`kdforge.data.table`); ``data.dataset: sst2|trec|emotion`` names a bundled set read
the same way (:mod:`kdforge.data.text_classification`). It holds a test and a validation
share out of train where the data has no such split (the same for every run with one
``split_seed``), applies the limits, names the classes (``label_names``, else sorted from
the training examples; integer labels index ``label_names``) and batches texts with the
family's tokenizer. With ``multi_label`` a row holds several labels (a list, or a string
split at ``label_separator``) and a batch's ``labels`` are multi-hot [B, C] floats.

It also gives what the ``labelled_texts`` capability promises (PGKD adds to the training
texts): the examples of a dataset, a dataset of examples, and what the classes mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch.utils.data import Dataset, Sampler

from kdforge.data.table import SourceFields, Table, data_files, read_table
from kdforge.data.text_classification import PRESETS, DatasetName, LabelledText
from kdforge.errors import DataError, RecipeError
from kdforge.objective import FIELD_MASKS
from kdforge.tasks.base import MOVED_TO_METHODS, Splits, refuse_moved_settings
from kdforge.tasks.encoders import field_masks

#: what the classes of each bundled set mean, for a generative teacher's prompt
DESCRIPTIONS = {name: preset.description for name, preset in PRESETS.items()}


class TextClassData(SourceFields):
    columns: dict[str, str | list[str]] = Field(
        {},
        description="which column holds each role: text, text_pair (optional) and label, e.g."
        " {text: review, label: stars}",
    )
    dataset: DatasetName | None = Field(
        None, description="a bundled set: sst2, trec or emotion (folders under KDFORGE_DATA_DIR); or give source"
    )
    path: str | None = Field(None, description="the bundled set's folder, when not KDFORGE_DATA_DIR/<dataset>")
    trec_labels: Literal["coarse", "fine"] = Field("coarse", description="TREC's 6 coarse or 50 fine classes")
    label_names: list[str] | None = Field(
        None,
        description="the classes in order (integer labels index them); default: the training labels, sorted",
    )
    multi_label: bool = Field(
        False, description="a row holds several labels (sigmoid outputs: binary_cross_entropy and binary_kd terms)"
    )
    label_separator: str = Field(",", description="multi_label: what separates the labels in a string")
    task_description: str | None = Field(
        None, description="what the classes mean in one sentence (a writing teacher's prompt, PGKD)"
    )
    max_length: int = Field(64, ge=8, description="tokens kept per text (per pair with text_pair)")
    train_limit: int | None = Field(None, ge=1, description="a random subset of N training examples (split_seed)")
    validation_limit: int | None = Field(None, ge=1, description="the first N validation examples only")
    test_limit: int | None = Field(None, ge=1, description="the first N test examples only")
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of train held out for validation where the data has no validation split"
    )
    test_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of train held out for testing where the data has no test split"
    )
    split_seed: int = 0

    _moved = model_validator(mode="before")(lambda data: refuse_moved_settings(data, MOVED_TO_METHODS))

    @model_validator(mode="after")
    def _one_source(self) -> TextClassData:
        given = self.source is not None or self.files is not None
        if (self.dataset is None) == (not given):
            raise ValueError(
                "data: give either dataset (sst2, trec or emotion) or your own data as source and files"
                " (e.g. source: csv, files: {train: train.csv}, columns: {text: review, label: stars})"
            )
        if self.path is not None and self.dataset is None:
            raise ValueError("data.path: names a bundled set's folder; for your own files use data.files")
        if self.dataset is not None and (self.columns or self.read_options):
            raise ValueError(
                f"data.columns: the bundled {self.dataset} has its own; to read another layout give source and files"
            )
        if self.label_names is not None and len(set(self.label_names)) != len(self.label_names):
            raise ValueError("data.label_names: a class is named twice; give each once")
        return self

    def source_fields(self) -> SourceFields:
        """The fields the table reader reads: the recipe's own, or the bundled set's."""
        if self.dataset is None:
            return self
        return PRESETS[self.dataset].fields(self.path or self.dataset, self.on_bad_rows)

    def check_files(self) -> None:
        with self.naming_the_set():
            data_files(self.source_fields())

    @contextmanager
    def naming_the_set(self) -> Iterator[None]:
        """A bundled set's missing or bad file named as the user gave it: data.path (or data.dataset)."""
        try:
            yield
        except DataError as exc:
            if self.dataset is None:
                raise
            field = "data.path" if self.path else "data.dataset"
            detail = str(exc).split(": ", 1)[-1].split("; ", 1)[0]
            raise DataError(
                f"{field}: {detail}; point data.path (or KDFORGE_DATA_DIR) at a {self.dataset} folder"
            ) from None

    def names(self) -> list[str] | None:
        if self.label_names is not None:
            return self.label_names
        return PRESETS[self.dataset].label_names if self.dataset is not None else None


class LabelledSet(Dataset):
    """Texts (with their pairs) and labels: a class index, or a list of them (multi-label)."""

    def __init__(self, texts: list[str], labels: list[Any], pairs: list[str] | None = None):
        self.texts = texts
        self.labels = labels
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = {"text": self.texts[index], "label": self.labels[index]}
        if self.pairs is not None:
            item["text_pair"] = self.pairs[index]
        return item


#: a family's tokenization of texts (and their pairs): input_ids, attention_mask (and token_type_ids), padded
Tokens = Callable[..., dict[str, torch.Tensor]]


class Part:
    """One split as read: texts, pairs (or None) and raw labels (a name or an integer; a list if multi-label)."""

    def __init__(self, texts: list[str], labels: list[Any], pairs: list[str] | None = None):
        self.texts, self.labels, self.pairs = texts, labels, pairs

    def take(self, index: np.ndarray | list[int]) -> Part:
        pairs = None if self.pairs is None else [self.pairs[i] for i in index]
        return Part([self.texts[i] for i in index], [self.labels[i] for i in index], pairs)


class LabelledTextSource:
    """Labelled texts, split and limited as ``data`` says, batched with ``tokens`` (see the module)."""

    def __init__(self, cfg: TextClassData, tokens: Tokens):
        self.cfg = cfg
        self.tokens = tokens

    # ---- reading ------------------------------------------------------------------------------
    @cached_property
    def table(self) -> Table:
        cfg = self.cfg
        fields = cfg.source_fields()
        preset = PRESETS[cfg.dataset] if cfg.dataset is not None else None
        with cfg.naming_the_set():
            return self._read(fields, preset)

    def _read(self, fields: SourceFields, preset: Any) -> Table:
        cfg = self.cfg
        if preset is not None and preset.parse is not None:
            table = read_table(fields, {"text": True}, texts=("text",), row_check=self._parses)
            for values in table.splits.values():
                parsed = [preset.parse(t, cfg.trec_labels) for t in values["text"]]
                values["text"] = [p[0] for p in parsed]  # type: ignore[index]
                values["label"] = [p[1] for p in parsed]  # type: ignore[index]
            return table
        roles = {"text": True, "text_pair": False, "label": True}
        return read_table(fields, roles, texts=("text", "text_pair"), row_check=self._label_problem)

    def _parses(self, row: dict[str, Any]) -> str | None:
        preset = PRESETS[self.cfg.dataset]  # type: ignore[index]
        return None if preset.parse(row["text"], self.cfg.trec_labels) else "is not a 'COARSE:fine question' line"

    def _label_problem(self, row: dict[str, Any]) -> str | None:
        label = row["label"]
        if isinstance(label, float):
            return "has a fractional label" if not np.isfinite(label) or label != int(label) else None
        if self.cfg.multi_label and isinstance(label, list) and not label:
            return None  # a row with no label at all is a real multi-label example
        if isinstance(label, str) and not label.strip():
            return "has an empty label"
        return None

    def _part(self, values: dict[str, list[Any]] | None) -> Part | None:
        if values is None:
            return None
        return Part(values["text"], [self._raw_label(v) for v in values["label"]], values.get("text_pair"))

    def _raw_label(self, value: Any) -> Any:
        if isinstance(value, (bool, float)):  # a reader's 1.0 or True is the integer label
            return int(value)
        if self.cfg.multi_label:
            if isinstance(value, str):
                return [v.strip() for v in value.split(self.cfg.label_separator) if v.strip()]
            if isinstance(value, list):
                return [int(v) if isinstance(v, float) else v for v in value]
            return [value]
        if isinstance(value, str):
            return value.strip()
        return value

    @cached_property
    def sets(self) -> tuple[Part, Part, Part]:
        """Train, validation and test, with raw labels (names or integers, not yet class indices)."""
        cfg, splits = self.cfg, self.table.splits
        train, validation, test = (self._part(splits.get(s)) for s in ("train", "validation", "test"))
        assert train is not None
        rng = np.random.default_rng(cfg.split_seed)
        if test is None:  # held out of train, the same for every run with this split_seed
            order = rng.permutation(len(train.texts))
            cut = max(1, round(len(order) * cfg.test_fraction))
            test, train = train.take(np.sort(order[:cut])), train.take(np.sort(order[cut:]))
        if validation is None:
            order = rng.permutation(len(train.texts))
            cut = max(1, round(len(order) * cfg.validation_fraction))
            validation = train.take(order[:cut])
            train = train.take(np.sort(order[cut:]))
        if not train.texts:
            raise DataError(f"{self._where()}: nothing is left to train on after the held-out shares; give more rows")
        if cfg.train_limit is not None and cfg.train_limit < len(train.texts):
            train = train.take(np.sort(rng.permutation(len(train.texts))[: cfg.train_limit]))
        if cfg.validation_limit is not None:
            validation = validation.take(np.arange(min(cfg.validation_limit, len(validation.texts))))
        if cfg.test_limit is not None:
            test = test.take(np.arange(min(cfg.test_limit, len(test.texts))))
        return train, validation, test

    def _where(self) -> str:
        return "data.files" if self.cfg.dataset is None else "data.dataset"

    # ---- classes ------------------------------------------------------------------------------
    @cached_property
    def class_names(self) -> list[str]:
        parts = self.sets
        raw = [label for part in parts for labels in part.labels for label in self._each(labels)]
        kinds = {type(label) for label in raw}
        # a reader gives one type per column: "1" next to "x" in a CSV or JSON file is a mix too
        numeric = {isinstance(label, int) or (isinstance(label, str) and label.lstrip("-").isdigit()) for label in raw}
        if kinds == {int, str} or numeric == {True, False}:
            example_int = next(label for label in raw if isinstance(label, int) or str(label).lstrip("-").isdigit())
            example_str = next(label for label in raw if isinstance(label, str) and not label.lstrip("-").isdigit())
            raise DataError(
                f"data.columns.label: {self.table.name} mixes integer labels ({example_int}) and string labels"
                f" ({example_str!r}); use one kind (names, or integers with data.label_names)"
            )
        given = self.cfg.names()
        if kinds == {int}:
            if given is None:
                return [str(i) for i in sorted({label for label in self._train_labels()})]
            outside = sorted({label for label in raw if not 0 <= label < len(given)})
            if outside:
                raise DataError(
                    f"data.label_names: {self.table.name} has label {outside[0]}, outside the {len(given)} names"
                    f" (integer labels index data.label_names from 0); name every class"
                )
            return list(given)
        if given is not None:
            outside = sorted({label for label in raw} - set(given))
            if outside:
                raise DataError(
                    f"data.label_names: {self.table.name} has label {outside[0]!r}, which data.label_names does not"
                    f" list ({', '.join(given[:6])}); add it, or fix the file"
                )
            return list(given)
        names = sorted(set(self._train_labels()))
        unknown = sorted({label for label in raw} - set(names))
        if unknown:
            raise RecipeError(
                f"data.train_limit: the training examples have no {', '.join(map(str, unknown[:5]))} (classes of the"
                " evaluation sets); use more training data, or list every class in data.label_names"
            )
        return names

    def _each(self, labels: Any) -> list[Any]:
        return labels if self.cfg.multi_label else [labels]

    def _train_labels(self) -> list[Any]:
        return [label for labels in self.sets[0].labels for label in self._each(labels)]

    def _index(self, label: Any) -> int:
        if isinstance(label, int) and self.cfg.names() is not None:
            return label  # integers index label_names
        return self._positions[str(label)]  # a name; or an integer among the sorted integers seen

    @cached_property
    def _positions(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.class_names)}

    def _labelled(self, part: Part) -> LabelledSet:
        if self.cfg.multi_label:
            labels: list[Any] = [sorted({self._index(v) for v in labels}) for labels in part.labels]
        else:
            labels = [self._index(label) for label in part.labels]
        return LabelledSet(part.texts, labels, part.pairs)

    # ---- the DataSource contract ----------------------------------------------------------------
    def splits(self) -> Splits:
        train, validation, test = self.sets
        self.class_names  # noqa: B018 (checks every label against the classes before any index is taken)
        return Splits(self._labelled(train), self._labelled(validation), self._labelled(test), "validation")

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        pairs = [item["text_pair"] for item in items] if "text_pair" in items[0] else None
        batch: dict[str, Any] = self.tokens([item["text"] for item in items], pairs)
        batch["labels"] = self.label_tensor([item["label"] for item in items])
        batch["token_mask"] = batch["attention_mask"].bool()
        batch[FIELD_MASKS] = field_masks()
        return batch

    def label_tensor(self, labels: list[Any]) -> torch.Tensor:
        """Class indices [B] (long), or multi-hot [B, C] (float) when multi-label."""
        if not self.cfg.multi_label:
            return torch.tensor(labels, dtype=torch.long)
        hot = torch.zeros(len(labels), len(self.class_names))
        for row, indices in enumerate(labels):
            hot[row, indices] = 1.0
        return hot

    def labels(self, dataset: Dataset) -> np.ndarray:
        """The class of each example of ``dataset``, in its order ([N], or multi-hot [N, C] when multi-label)."""
        return self.label_tensor([dataset[i]["label"] for i in range(len(dataset))]).numpy()

    def data_files(self) -> list[Path]:
        return data_files(self.cfg.source_fields())

    def train_sampler(self, seed: int) -> Sampler[int] | None:
        return None

    def training_info(self, steps: int) -> dict[str, Any]:
        skipped = {split: n for split, n in self.table.skipped.items() if n}
        return {"skipped_rows": skipped} if skipped else {}

    # ---- what the labelled_texts capability gives (PGKD) ------------------------------------
    def labelled_texts(self, dataset: Dataset) -> list[LabelledText]:
        return [
            LabelledText(item["text"], item["label"], "train") for item in (dataset[i] for i in range(len(dataset)))
        ]

    def dataset_of(self, examples: list[LabelledText]) -> Dataset:
        return LabelledSet([e.text for e in examples], [e.label for e in examples])

    def task_description(self) -> str:
        """What the classes mean, in one sentence (a generative teacher's prompt)."""
        cfg = self.cfg
        if cfg.task_description is not None:
            return cfg.task_description
        if cfg.dataset is not None:
            return DESCRIPTIONS[cfg.dataset]
        return f"Classify texts as one of: {', '.join(self.class_names)}."
