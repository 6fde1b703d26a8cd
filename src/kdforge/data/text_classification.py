"""The bundled labelled-text sets (SST-2, TREC, emotion) as data sources over the one table reader.

A recipe's ``data.dataset: sst2`` is shorthand for the ``source``/``files``/``columns`` it
would otherwise spell out (:attr:`Preset.fields`): every set, bundled or the user's, is read
by :func:`kdforge.data.table.read_table`, so there is one path. Folders are looked up in
``KDFORGE_DATA_DIR`` (see ../shared/data/README.md for their layouts):

- ``sst2/{train,dev,test}.tsv``: header ``label<TAB>sentence`` (0 negative, 1 positive);
- ``trec/train_5500.label``, ``trec/TREC_10.label``: ``COARSE:fine question`` per line;
- ``emotion/{train,val,test}.txt``: header ``text;label_name``, then ``text;label``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from kdforge.data.table import SourceFields

DatasetName = Literal["sst2", "trec", "emotion"]


@dataclass(frozen=True)
class LabelledText:
    """One training or validation example; ``source`` says where it came from ("train", "teacher round 2")."""

    text: str
    label: int
    source: str = "train"


@dataclass(frozen=True)
class Preset:
    """A bundled set: its files in its folder, how they are read, and what its classes mean."""

    files: dict[str, str]
    source: str
    columns: dict[str, str]
    description: str
    read_options: dict[str, Any] = field(default_factory=dict)
    label_names: list[str] | None = None
    #: turns a raw row into (text, label) for a set whose lines are not columns (TREC); None: bad row
    parse: Callable[[str, str], tuple[str, str] | None] | None = None

    def fields(self, folder: str, on_bad_rows: str = "skip") -> SourceFields:
        return SourceFields(
            source=self.source,
            files={split: f"{folder}/{name}" for split, name in self.files.items()},
            columns=self.columns,
            read_options=self.read_options,
            on_bad_rows=on_bad_rows,  # type: ignore[arg-type]
        )


def parse_trec(line: str, labels: str) -> tuple[str, str] | None:
    """``COARSE:fine question`` as (question, coarse or coarse:fine label); None for another line."""
    label, sep, text = line.partition(" ")
    coarse, _, fine = label.partition(":")
    if not sep or not fine or not coarse or not text.strip():
        return None
    return text.strip(), coarse if labels == "coarse" else label


#: quoting 3 (csv.QUOTE_NONE): the sets' texts hold quote characters that are text, not quoting
PRESETS: dict[str, Preset] = {
    "sst2": Preset(
        files={"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"},
        source="csv",
        columns={"text": "sentence", "label": "label"},
        # the header says "sentence" in train.tsv and "content" in dev.tsv and test.tsv: one name for both
        read_options={"delimiter": "\t", "quoting": 3, "names": ["label", "sentence"], "header": 0},
        label_names=["negative", "positive"],
        description="Classify the sentiment of movie-review sentences as negative or positive.",
    ),
    "trec": Preset(
        files={"train": "train_5500.label", "test": "TREC_10.label"},
        source="text",
        columns={},
        read_options={"encoding_errors": "replace"},  # train_5500.label has a few Latin-1 bytes
        description="Classify questions by the type of their answer: ABBR abbreviation, DESC description,"
        " ENTY entity, HUM human, LOC location, NUM numeric value.",
        parse=parse_trec,
    ),
    "emotion": Preset(
        files={"train": "train.txt", "validation": "val.txt", "test": "test.txt"},
        source="csv",
        columns={"text": "text", "label": "label_name"},
        read_options={"delimiter": ";", "quoting": 3},
        description="Classify the emotion expressed in short English tweets.",
    ),
}
