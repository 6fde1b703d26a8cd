"""The progress bar of long steps that count items (teacher generations, cache writing)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kdforge.settings import progress_enabled


def counting_progress(*, console: Console | None = None, transient: bool = False) -> Progress:
    """Description, bar, done/total, elapsed and remaining time; off with ``KDFORGE_PROGRESS=0``."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not progress_enabled(),
        transient=transient,
    )
