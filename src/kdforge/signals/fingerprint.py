"""Fingerprints that tie a teacher cache to the run it was made for.

A cache is only valid for the same teacher weights, tokenizer, training data and
settings (temperature, k, dtype, fields). Each part is a short sha256 so that a
mismatch can be named part by part (see ``cache_store.fingerprint_differences``).
Files are hashed by content, streamed; a file's hash is remembered for the life of
the process by (path, size, mtime), since weight files are large.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kdforge.signals.cache_store import CacheDtype, file_sha256

_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def _file_hash(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        _FILE_HASHES[key] = file_sha256(path)
    return _FILE_HASHES[key]


def files_digest(paths: Iterable[Path]) -> str:
    """sha256 (16 hex) over the files' names and contents, in name order; ``none`` for no files."""
    paths = sorted({Path(p) for p in paths if Path(p).is_file()}, key=lambda p: p.name)
    if not paths:
        return "none"
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(_file_hash(path).encode())
    return digest.hexdigest()[:16]


def value_digest(value: Any) -> str:
    """sha256 (16 hex) of a JSON-able value, key order ignored."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_settings(*, k: int, dtype: CacheDtype, temperature: float, fields: list[str]) -> dict[str, Any]:
    return {"k": k, "dtype": dtype, "temperature": temperature, "fields": sorted(fields)}


def cache_fingerprint(
    task, settings: dict[str, Any], *, teacher_ref: str | None, field: str = "teacher.model"
) -> dict[str, Any]:
    """The parts a cache must match: teacher weights, tokenizer, dataset, settings.

    Without ``teacher_ref`` the teacher is left out (a run that reads a cache without
    naming the teacher model can check only the rest).
    """
    recipe = task.recipe
    parts: dict[str, Any] = {
        "task": recipe.task,
        "dataset": value_digest(
            {"data": recipe.data, "files": files_digest(task.data_files()), **task.data_identity()}
        ),
        "tokenizer": files_digest(task.tokenizer_files()),
        "settings": settings,
    }
    if teacher_ref:
        weights = task.teacher_weight_files(teacher_ref, field)
        parts["teacher"] = files_digest(weights) if weights else value_digest(teacher_ref)
    return parts
