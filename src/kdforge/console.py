"""The consoles kdforge prints on: rich's at a terminal; to a file or a pipe, lines never cut.

Rich fits what it prints to the terminal's width, and with no terminal to 80 columns (or
``COLUMNS``): a table written to a log or captured by CI had its cells cut short ("ndcg…"). With
no terminal there is no width to fit, so none is imposed and a table is printed whole.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console, ConsoleDimensions

#: the width of a console that writes to no terminal: wide enough for any table kdforge prints
UNBOUNDED = 10_000


class _Console(Console):
    def __init__(self, *, width: int | None = None, **kwargs: Any):
        super().__init__(width=width, **kwargs)
        self._asked_width = width

    @property
    def size(self) -> ConsoleDimensions:
        found = Console.size.fget(self)  # type: ignore[attr-defined]
        if self.is_terminal or self._asked_width is not None:
            return found
        return ConsoleDimensions(UNBOUNDED, found.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


def make_console(*, stderr: bool = False, **kwargs: Any) -> Console:
    """A rich console on stdout (or stderr) that, writing to no terminal, cuts and wraps no line.

    Whether the stream is a terminal is asked at each print, so a console made at import time
    serves a test that captures the output as it serves a user at a terminal.
    """
    return _Console(stderr=stderr, **kwargs)
