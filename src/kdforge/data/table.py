"""Any dataset a user has, read through Hugging Face ``datasets``: the ``data`` section every task shares.

A task's data schema inherits :class:`SourceFields` (``source``, ``files``, ``columns``,
``read_options``, ``on_bad_rows``) and asks :func:`read_table` for the columns it reads,
by role (``text``, ``label``, ``prompt`` ...); the recipe maps each role to a column of
the file (``columns: {text: description, label: class}``), and an unmapped role reads the
column of its own name. What comes back is each split's values per role, in the file's
order (examples keep stable indexes: a teacher cache reads them by position), with the
rows that had an empty text or a missing value skipped and counted, or refused
(``on_bad_rows: error``).

``source`` is a format that ``datasets.load_dataset`` reads (csv, json for JSON and
JSON lines, parquet, text, arrow), a folder written by ``save_to_disk``, or a hub id
(with a network; offline, one line says how to point at local files). Every problem
with the data is one :class:`~kdforge.errors.DataError` naming the file and the fix,
raised before anything is written.
"""

from __future__ import annotations

import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from kdforge.data.paths import resolve_data_path
from kdforge.errors import DataError
from kdforge.recipe import Strict
from kdforge.settings import cache_dir

#: the formats of ``datasets``' packaged builders a recipe may name, and the extensions that imply them
FORMATS = ("csv", "json", "parquet", "text", "arrow")
EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".txt": "text",
    ".arrow": "arrow",
}
#: the split names files may be given under, and the one kdforge uses
SPLITS = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
}

Files = str | list[str] | dict[str, str | list[str]]


class SourceFields(Strict):
    """Where a task's examples come from: the fields every task's ``data`` section shares."""

    source: str | None = Field(
        None,
        description="csv, json (also JSON lines), parquet, text or arrow (with files); a folder written by"
        " save_to_disk; or a Hugging Face hub id (needs a network)",
    )
    files: Files | None = Field(
        None,
        description="the data files: one path, a list, or {train: ..., validation: ..., test: ...} (datasets'"
        " data_files); relative paths are looked for here, then in KDFORGE_DATA_DIR",
    )
    columns: dict[str, str | list[str]] = Field(
        {},
        description="which column the task reads for each role, e.g. {text: description, label: class}; a list"
        " of columns joins their texts with a space (text roles only)",
    )
    read_options: dict[str, Any] = Field(
        {},
        description="passed to datasets.load_dataset as they are, e.g. {delimiter: ';'} for csv, {name: CONFIG}"
        " for a hub dataset's configuration",
    )
    on_bad_rows: Literal["skip", "error"] = Field(
        "skip", description="a row with an empty text or a missing value: skip it (counted in the report) or stop"
    )

    def check_files(self) -> None:
        """Every file the section names exists (``kdforge validate``); a task's schema adds its own."""
        if self.files is not None or self.source is not None:
            data_files(self)

    @model_validator(mode="after")
    def _files_for_a_format(self) -> SourceFields:
        if self.source in FORMATS and self.files is None:
            raise ValueError(
                f"data.files: source {self.source} reads files; name them, e.g. files: {{train: train.{self.source}}}"
            )
        return self

    @field_validator("source")
    @classmethod
    def _known_source(cls, source: str | None) -> str | None:
        if source == "jsonl":
            return "json"  # what a user calls it; datasets reads JSON lines with its json builder
        return source


@dataclass
class Table:
    """Each split's values per role, in the files' order, and what was read (see the module)."""

    splits: dict[str, dict[str, list[Any]]]
    #: the files read (a teacher cache's fingerprint hashes them); empty for a hub dataset
    files: list[Path]
    #: rows skipped per split (an empty text, a missing value)
    skipped: dict[str, int] = field(default_factory=dict)
    #: what the data is, in a few words (the model card's datasets line): a hub id or the file names
    name: str = ""


def _where(fields: SourceFields, prefix: str) -> str:
    return f"{prefix}.files" if fields.files is not None else f"{prefix}.source"


def resolve_files(fields: SourceFields, prefix: str = "data") -> dict[str, list[Path]]:
    """``files`` as existing paths per split (a single path or a list is the train split)."""
    given = fields.files
    if given is None:
        return {}
    by_split: dict[str, str | list[str]] = dict(given) if isinstance(given, dict) else {"train": given}
    out: dict[str, list[Path]] = {}
    for split, paths in by_split.items():
        name = SPLITS.get(str(split).lower())
        if name is None:
            raise DataError(
                f"{prefix}.files: {split!r} is not a split; name them train, validation and test (dev and val"
                " also mean validation)"
            )
        where = f"{prefix}.files.{split}" if isinstance(given, dict) else f"{prefix}.files"
        listed = [paths] if isinstance(paths, str) else list(paths)
        if not listed:
            raise DataError(f"{where}: lists no file; give at least one path")
        out.setdefault(name, []).extend(resolve_data_path(p, where) for p in listed)
    return out


def source_format(fields: SourceFields, files: dict[str, list[Path]], prefix: str = "data") -> str:
    """The ``datasets`` builder that reads the files: the one named, else the one their extension implies."""
    if fields.source in FORMATS:
        return fields.source
    if fields.source is not None:
        raise DataError(
            f"{prefix}.source: {fields.source!r} is not a format; with data.files give one of {', '.join(FORMATS)},"
            " or leave source out to take the files' extension"
        )
    kinds = {EXTENSIONS.get(path.suffix.lower()) for paths in files.values() for path in paths}
    if len(kinds) != 1 or None in kinds:
        names = ", ".join(sorted({p.name for paths in files.values() for p in paths}))
        raise DataError(
            f"{prefix}.source: cannot tell the format of {names} from the extension; set data.source to one of"
            f" {', '.join(FORMATS)}"
        )
    return next(iter(kinds))  # type: ignore[return-value]


def data_files(fields: SourceFields, prefix: str = "data") -> list[Path]:
    """Every file the section reads (checked to exist): the fingerprint's and ``kdforge validate``'s list."""
    if fields.files is not None:
        return [path for paths in resolve_files(fields, prefix).values() for path in paths]
    if fields.source is not None and _is_local(fields.source):
        folder = resolve_data_path(fields.source, f"{prefix}.source")
        return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else [folder]
    return []


def _is_local(source: str) -> bool:
    """A path (it exists, or it looks like one) rather than a hub id such as ``org/name``."""
    if Path(source).expanduser().exists() or source.startswith((".", "/", "~")):
        return True
    try:
        resolve_data_path(source)
        return True
    except DataError:
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub answers at all: ``datasets`` would otherwise retry for half a minute offline."""
    from huggingface_hub import constants

    host = urllib.parse.urlsplit(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load(fields: SourceFields, prefix: str, *, streaming: bool = False) -> tuple[dict[str, Any], list[Path], str]:
    """The raw splits as ``datasets`` reads them, the files read, and the data's name."""
    import datasets

    datasets.disable_progress_bars()  # kdforge's own progress lines say what is read
    # a bad file is kdforge's one line, not datasets' logged error too
    datasets.utils.logging.set_verbosity(datasets.utils.logging.CRITICAL)
    options = dict(fields.read_options)
    if fields.files is not None:
        files = resolve_files(fields, prefix)
        for split, paths in files.items():
            for path in paths:
                if path.is_file() and not path.read_bytes()[:4096].strip():
                    raise DataError(
                        f"{_where(fields, prefix)}: {path} (the {split} split) is empty and holds no rows; give a"
                        " file with data"
                    )
        by_kind: dict[str, dict[str, list[Path]]] = {}
        if fields.source is None:  # each split in the format its extension says (train.parquet, test.csv)
            for split, paths in files.items():
                by_kind.setdefault(source_format(fields, {split: paths}, prefix), {})[split] = paths
        else:
            by_kind[source_format(fields, files, prefix)] = files
        splits: dict[str, Any] = {}
        for kind, group in by_kind.items():
            splits.update(_load_files(kind, group, fields, prefix, options, streaming))
        return splits, [p for ps in files.values() for p in ps], _name(files)
    if fields.source is None:
        raise DataError(f"{prefix}: give data.source and data.files (e.g. source: csv, files: {{train: train.csv}})")
    if _is_local(fields.source):
        folder = resolve_data_path(fields.source, f"{prefix}.source")
        if folder.is_file():
            fields = fields.model_copy(update={"files": str(folder), "source": None})
            return _load(fields, prefix, streaming=streaming)
        try:
            loaded = datasets.load_from_disk(str(folder))
        except Exception as exc:  # noqa: BLE001
            raise DataError(
                f"{prefix}.source: {folder} is not a folder written by save_to_disk ({_first(exc)}); give data.files"
                " with the data files in it instead"
            ) from None
        splits = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
        return splits, data_files(fields, prefix), folder.name
    if not _hub_reachable():
        raise DataError(
            f"{prefix}.source: {fields.source!r} is not a local file or folder and the Hugging Face Hub cannot be"
            f" reached (offline); download it where there is a network (`datasets.load_dataset({fields.source!r})"
            ".save_to_disk(DIR)`) and set data.source to DIR, or export it to csv/json/parquet and give data.files"
        )
    try:
        loaded = datasets.load_dataset(fields.source, streaming=streaming, **options)
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{prefix}.source: cannot load {fields.source!r} from the hub ({_first(exc)})") from None
    return dict(loaded), [], fields.source


def _load_files(
    kind: str, files: dict[str, list[Path]], fields: SourceFields, prefix: str, options: dict, streaming: bool
) -> dict[str, Any]:
    """The splits of ``files`` read by ``datasets``' builder ``kind``; a bad file is one line naming it."""
    import datasets

    options = dict(options)
    if kind == "csv" and all(p.suffix.lower() == ".tsv" for paths in files.values() for p in paths):
        options.setdefault("delimiter", "\t")
    if kind == "csv":
        # an empty cell is a missing value; the text "NA" or "null" is a text, as users mean it
        options.setdefault("keep_default_na", False)
        options.setdefault("na_values", [""])
    root = cache_dir() / "datasets"
    existed = {p for p in (root, *root.parents) if p.exists()}
    started = time.time()
    try:
        loaded = datasets.load_dataset(
            kind,
            data_files={split: [str(p) for p in paths] for split, paths in files.items()},
            cache_dir=None if streaming else str(root),
            streaming=streaming,
            **options,
        )
        return dict(loaded)
    except BaseException as exc:
        _tidy(root, existed, started)
        error = _read_error(exc, kind, files, fields, prefix)
        if error is None:
            raise
        raise error from None


def _tidy(root: Path, existed: set[Path], started: float) -> None:
    """After a failed read, remove what ``datasets`` began in its cache (locks, partial builds, empty folders):
    a mistake in the data leaves nothing behind."""
    if not root.exists():
        return
    for path in sorted(root.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        try:
            if path.is_file() and path.stat().st_mtime >= started - 1 and path.name.endswith((".lock", ".incomplete")):
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()
        except OSError:
            continue
    for folder in (root, *root.parents):
        if folder in existed or not folder.exists() or any(folder.iterdir()):
            break
        folder.rmdir()


def _read_error(
    exc: BaseException, kind: str, files: dict[str, list[Path]], fields: SourceFields, prefix: str
) -> DataError | None:
    """What a failed read means for the user, or None for an error that is not the data's."""
    if isinstance(exc, TypeError):
        if "unexpected keyword" in str(exc):
            return DataError(f"{prefix}.read_options: {_first(exc)}; remove the option the {kind} reader does not take")
        return None
    if isinstance(exc, DataError) or not isinstance(exc, Exception):
        return None
    # pyarrow, pandas and json raise many kinds of error for a bad file
    return DataError(
        f"{_where(fields, prefix)}: {_name(files)} could not be read as {kind} ({_first(exc)}); set"
        f" {prefix}.source to the files' format ({', '.join(FORMATS)}) or fix the file"
    )


def _name(files: dict[str, list[Path]]) -> str:
    return ", ".join(sorted({p.name for ps in files.values() for p in ps}))


def _first(exc: BaseException) -> str:
    while exc.__cause__ is not None and type(exc).__name__ == "DatasetGenerationError":
        exc = exc.__cause__  # datasets wraps the reader's own error, which says what is wrong
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _normalise_splits(raw: dict[str, Any], prefix: str) -> dict[str, Any]:
    splits: dict[str, Any] = {}
    for name, split in raw.items():
        splits.setdefault(SPLITS.get(str(name).lower(), str(name)), split)
    if "train" not in splits:
        raise DataError(
            f"{prefix}.files: no train split (found {', '.join(map(str, raw)) or 'none'}); give"
            " files: {train: ...} (a single path is the train split)"
        )
    return {name: splits[name] for name in ("train", "validation", "test") if name in splits}


def table_columns(fields: SourceFields, prefix: str = "data") -> list[str]:
    """The columns of the train split (what a task that reads one of several layouts looks at first)."""
    raw, _, _ = _load(fields, prefix)
    return list(_normalise_splits(raw, prefix)["train"].column_names)


def column_of(fields: SourceFields, role: str) -> str | list[str]:
    return fields.columns.get(role, role)


def _join(values: Any) -> str | None:
    """One row's texts of several columns as one text (a missing or blank value leaves its column out)."""
    texts = [str(v).strip() for v in values if v is not None and str(v).strip()]
    return " ".join(texts) if texts else None


def _joined(arrow: Any, columns: list[str]) -> list[Any]:
    """Several text columns as one text per row."""
    return [_join(values) for values in zip(*(arrow[column].to_pylist() for column in columns))]


def check_roles(
    fields: SourceFields, roles: Mapping[str, bool], prefix: str = "data", texts: tuple[str, ...] = ()
) -> None:
    """``columns`` maps only roles the task reads (a typo is an error, not an ignored mapping)."""
    unknown = sorted(set(fields.columns) - set(roles))
    if unknown:
        raise DataError(
            f"{prefix}.columns.{unknown[0]}: not a role this task reads; map {', '.join(roles)} to your columns"
        )
    for role, column in fields.columns.items():
        if isinstance(column, list) and role not in texts:
            raise DataError(f"{prefix}.columns.{role}: only a text is joined from several columns; name one column")


def read_table(
    fields: SourceFields,
    roles: Mapping[str, bool],
    *,
    prefix: str = "data",
    texts: tuple[str, ...] = (),
    row_check: Callable[[dict[str, Any]], str | None] | None = None,
) -> Table:
    """The values of ``roles`` (role -> required) in each split, bad rows skipped or refused.

    ``texts`` names the roles that must hold a non-empty string; every role read must hold
    a value. ``row_check`` may name any other problem of a row (returned as a short reason).
    """
    check_roles(fields, roles, prefix, texts)
    raw, files, name = _load(fields, prefix)
    splits = _normalise_splits(raw, prefix)
    out: dict[str, dict[str, list[Any]]] = {}
    skipped: dict[str, int] = {}
    for split, dataset in splits.items():
        where = _split_files(fields, split, prefix) or name
        present = list(dataset.column_names)
        wanted: dict[str, str | list[str]] = {}
        for role, required in roles.items():
            column = column_of(fields, role)
            missing = [c for c in ([column] if isinstance(column, str) else column) if c not in present]
            if not missing:
                wanted[role] = column
            elif required or role in fields.columns:
                setting = f"{prefix}.columns.{role}"
                raise DataError(
                    f"{setting}: {where} has no column {missing[0]!r} (its columns: {', '.join(present)}); set"
                    f" {setting} to the column that holds it"
                )
        if len(dataset) == 0:
            raise DataError(
                f"{_where(fields, prefix)}: the {split} split of {where} holds no rows; give a file with data"
            )
        arrow = dataset.with_format("arrow")  # one column as Python values in one pass (row access is slow)
        values = {
            role: arrow[column].to_pylist() if isinstance(column, str) else _joined(arrow, column)
            for role, column in wanted.items()
        }
        keep, bad = _good_rows(values, texts, row_check)
        if bad and fields.on_bad_rows == "error":
            row, reason = bad[0]
            raise DataError(
                f"{prefix}.on_bad_rows: {where} row {row + 1} of the {split} split {reason} ({len(bad)} such rows);"
                f" fix the file, or set {prefix}.on_bad_rows: skip to leave them out"
            )
        if len(keep) == 0:
            raise DataError(
                f"{_where(fields, prefix)}: every row of the {split} split of {where} is empty or bad; fix the file"
            )
        if bad:
            values = {role: [column[i] for i in keep] for role, column in values.items()}
        out[split] = values
        skipped[split] = len(bad)
        if bad:
            _warn(
                f"data: {len(bad)} of {len(bad) + len(keep)} rows of the {split} split of {where} skipped (the first,"
                f" row {bad[0][0] + 1}, {bad[0][1]}); set {prefix}.on_bad_rows: error to stop instead"
            )
    return Table(out, files, skipped, name)


def _warn(message: str) -> None:
    """One line on stderr, from the main process only (every process reads the same data)."""
    from kdforge.console import make_console
    from kdforge.distributed import is_main

    if is_main():
        make_console(stderr=True).print(f"[yellow]{message}", highlight=False, soft_wrap=True)


def _split_files(fields: SourceFields, split: str, prefix: str) -> str:
    if fields.files is None:
        return ""
    files = resolve_files(fields, prefix).get(split, [])
    return ", ".join(str(p) for p in files)


def _good_rows(
    values: dict[str, list[Any]], texts: tuple[str, ...], row_check: Callable[[dict[str, Any]], str | None] | None
) -> tuple[list[int], list[tuple[int, str]]]:
    n = len(next(iter(values.values()))) if values else 0
    keep: list[int] = []
    bad: list[tuple[int, str]] = []
    for i in range(n):
        reason = None
        for role, column in values.items():
            value = column[i]
            if value is None:
                reason = f"has no {role}"
            elif role in texts and (not isinstance(value, str) or not value.strip()):
                reason = f"has an empty {role}" if isinstance(value, str) else f"has a {type(value).__name__} {role}"
            if reason:
                break
        if reason is None and row_check is not None:
            reason = row_check({role: column[i] for role, column in values.items()})
        if reason is None:
            keep.append(i)
        else:
            bad.append((i, reason))
    return keep, bad


def given_splits(fields: SourceFields, prefix: str = "data") -> list[str]:
    """The splits the data gives (train, validation, test), without reading the rows of files."""
    if fields.files is not None:
        return [s for s in ("train", "validation", "test") if s in resolve_files(fields, prefix)]
    raw, _, _ = _load(fields, prefix, streaming=True)
    return list(_normalise_splits(raw, prefix))


def stream_column(fields: SourceFields, role: str, *, split: str = "train", prefix: str = "data") -> Iterator[str]:
    """One column's values, read row by row without holding the file in memory (``streaming``)."""
    raw, _, name = _load(fields, prefix, streaming=True)
    splits = _normalise_splits(raw, prefix)
    if split not in splits:
        return
    column = column_of(fields, role)
    columns = [column] if isinstance(column, str) else column
    for row in splits[split]:
        missing = [c for c in columns if c not in row]
        if missing:
            setting = f"{prefix}.columns.{role}"
            raise DataError(
                f"{setting}: {name} has no column {missing[0]!r} (its columns: {', '.join(row)}); set {setting} to"
                " the column that holds it"
            )
        value = _join(row[c] for c in columns)
        if value:
            yield value


class LazyTexts:
    """One text role of every split, read from the memory-mapped table when an example is used.

    Only the positions of the rows with a text are held (8 bytes a row), so memory stays flat
    however large the file; the table itself stays on disk in ``datasets``' Arrow cache.
    """

    def __init__(self, fields: SourceFields, role: str, prefix: str = "data", batch_rows: int = 10_000):
        raw, self.files, self.name = _load(fields, prefix)
        splits = _normalise_splits(raw, prefix)
        column = column_of(fields, role)
        self.columns = [column] if isinstance(column, str) else column
        self.parts: list[tuple[Any, Any]] = []
        self.skipped = 0
        import numpy as np

        for split, dataset in splits.items():
            missing = [c for c in self.columns if c not in dataset.column_names]
            if missing:
                raise DataError(
                    f"{prefix}.columns.{role}: the {split} split has no column {missing[0]!r} (its columns:"
                    f" {', '.join(dataset.column_names)}); set {prefix}.columns.{role} to the column that holds it"
                )
            keep: list[Any] = []
            arrow = dataset.with_format("arrow")
            for start in range(0, len(dataset), batch_rows):
                chunk = arrow[start : start + batch_rows]
                texts = _joined(chunk, self.columns)
                good = np.array([t is not None for t in texts], dtype=bool)
                keep.append(np.flatnonzero(good) + start)
                self.skipped += int((~good).sum())
            rows = np.concatenate(keep) if keep else np.zeros(0, dtype=np.int64)
            self.parts.append((dataset, rows))
        self.offsets = np.cumsum([0] + [len(rows) for _, rows in self.parts])
        if self.offsets[-1] == 0:
            raise DataError(f"{prefix}.files: {self.name} holds no text in {', '.join(self.columns)}; fix the file")

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> str:
        import numpy as np

        if not 0 <= index < len(self):
            raise IndexError(index)
        part = int(np.searchsorted(self.offsets, index, side="right")) - 1
        dataset, rows = self.parts[part]
        row = dataset[int(rows[index - self.offsets[part]])]
        return _join(row[c] for c in self.columns) or ""


def seeded_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``n`` indexes split in two: the rest (in order) and a seeded ``fraction`` held out (in order)."""
    import numpy as np

    if n < 2:
        return list(range(n)), []
    order = np.random.default_rng(seed).permutation(n)
    cut = min(n - 1, max(1, round(n * fraction)))
    return sorted(order[cut:].tolist()), sorted(order[:cut].tolist())
