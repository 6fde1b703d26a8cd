"""The progress of long steps that count items (training, teacher generations, cache writing).

At a terminal, a live rich bar. Written to a file or a pipe (a log, CI, ``nohup``), a bar
cannot be redrawn and leaves blank lines and escape codes, so plain lines are printed
instead (``teacher answers: 40/128 (12 s)``): when a task starts, after each further tenth of it,
at least once a minute while it runs, and when it ends. ``KDFORGE_PROGRESS=0`` turns both off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kdforge.console import make_console
from kdforge.settings import progress_enabled

#: a plain line is printed after each such share of a task's total
STEP_SHARE = 0.1
#: and at least this often (seconds) while a task advances, so a log shows a long step is alive
HEARTBEAT = 60.0


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    visible: bool
    fields: dict[str, Any]
    started: float = field(default_factory=time.monotonic)
    shown_at: float = 0.0
    #: the count the last line showed; None before the first
    shown_count: float | None = None


class PlainProgress:
    """The part of rich's :class:`~rich.progress.Progress` kdforge uses, as plain progress lines."""

    def __init__(self, console: Console):
        self.console = console
        self._tasks: list[_Task] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:  # a step that failed says so itself; a finished one ends on its last count
            for task in self._tasks:
                if task.shown_count != task.completed:
                    self._show(task)

    def add_task(
        self,
        description: str,
        total: float | None = None,
        completed: float = 0,
        visible: bool = True,
        **fields: Any,
    ) -> int:
        self._tasks.append(_Task(description, total, completed, visible, fields))
        self._show(self._tasks[-1])
        return len(self._tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(
        self,
        task_id: int,
        *,
        completed: float | None = None,
        advance: float | None = None,
        total: float | None = None,
        description: str | None = None,
        visible: bool | None = None,
        **fields: Any,
    ) -> None:
        task = self._tasks[task_id]
        if total is not None:
            task.total = total
        if description is not None:
            task.description = description
        if visible is not None:
            task.visible = visible
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        task.fields.update(fields)
        if self._due(task):
            self._show(task)

    def _due(self, task: _Task) -> bool:
        if task.shown_count is None:
            return True
        if task.total:
            step = task.total * STEP_SHARE
            if task.completed >= task.total or int(task.completed // step) > int(task.shown_count // step):
                return True
        return time.monotonic() - task.shown_at >= HEARTBEAT

    def _show(self, task: _Task) -> None:
        if not task.visible:
            return
        count = f"{task.completed:g}" + (f"/{task.total:g}" if task.total is not None else "")
        extra = " ".join(str(v) for v in task.fields.values() if str(v))
        elapsed = time.monotonic() - task.started
        line = f"{task.description}: {count}" + (f" {extra}" if extra else "") + f" ({elapsed:.0f} s)"
        self.console.print(escape(line), highlight=False, soft_wrap=True)
        task.shown_count, task.shown_at = task.completed, time.monotonic()


def _progress(columns: list[Any], console: Console | None, transient: bool) -> Progress | PlainProgress:
    shown = console if console is not None else make_console(stderr=True)
    if progress_enabled() and not shown.is_terminal:
        return PlainProgress(shown)
    return Progress(*columns, console=shown, disable=not progress_enabled(), transient=transient)


def counting_progress(*, console: Console | None = None, transient: bool = False) -> Progress | PlainProgress:
    """Description, bar, done/total, elapsed and remaining time (on stderr unless ``console`` is given);
    plain lines where that is no terminal; off with ``KDFORGE_PROGRESS=0``."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    return _progress(columns, console, transient)


def training_progress(enabled: bool) -> Progress | PlainProgress:
    """The training bar: as :func:`counting_progress`, with the last step's loss terms (the task's ``terms``)."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[terms]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    if not enabled:
        return Progress(*columns, disable=True)
    return _progress(columns, None, transient=False)
