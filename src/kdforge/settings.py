"""Locations kdforge reads from, each set by one environment variable."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """Where shared datasets live: ``KDFORGE_DATA_DIR``, default ``../shared/data``."""
    return Path(os.environ.get("KDFORGE_DATA_DIR", "../shared/data")).expanduser()


def progress_enabled() -> bool:
    """Progress bars, unless ``KDFORGE_PROGRESS=0`` (useful in logs and CI)."""
    return os.environ.get("KDFORGE_PROGRESS", "1") not in ("0", "false", "no")


def cache_dir() -> Path:
    """Where kdforge keeps what it can make again but would rather not (generated responses):
    ``KDFORGE_CACHE_DIR``, default ``~/.cache/kdforge``."""
    return Path(os.environ.get("KDFORGE_CACHE_DIR", "~/.cache/kdforge")).expanduser()


def process_wait_minutes() -> float:
    """How long a process of an ``accelerate launch`` run waits for the others (the main one evaluates
    and writes the report while they wait): ``KDFORGE_WAIT_MINUTES``, default 180."""
    return float(os.environ.get("KDFORGE_WAIT_MINUTES", "180"))
