"""SIGTERM and SIGINT as a request to stop at the next safe point, not an abrupt end.

A pre-empted machine sends SIGTERM and waits a little before SIGKILL; a user presses
Ctrl-C. Either way the long loops (training, writing a teacher cache) finish the unit of
work in hand, save it (a checkpoint, a shard) and raise :class:`~kdforge.errors.Interrupted`,
which the CLI turns into a one-line message and exit code 143 (SIGTERM) or 130 (SIGINT).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def stop_requests() -> Iterator[dict[str, Any]]:
    """A flag, ``{"stop": None}``, set to the signal's name (``SIGTERM``, ``SIGINT``) when one arrives.

    The loop checks it after each unit of work. A second Ctrl-C stops at once
    (KeyboardInterrupt), for a user who will not wait for the unit to end. Outside the
    main thread no handler can be set: the flag then never changes.
    """
    flag: dict[str, Any] = {"stop": None}

    def handler(signum, frame):  # noqa: ARG001
        if signum == signal.SIGINT and flag["stop"] is not None:
            raise KeyboardInterrupt
        flag["stop"] = signal.Signals(signum).name

    with _handling(handler):
        yield flag


@contextmanager
def stop_between_units(what: str) -> Iterator[None]:
    """Around a whole command: a SIGTERM or SIGINT that arrives outside the loops that save their
    own work (loading, evaluating, writing the report) ends the command at once with
    :class:`~kdforge.errors.Interrupted`. That is safe because every file kdforge writes is
    written aside and renamed: what is finished stays, what is not is done again by ``--resume``.
    """
    from kdforge.errors import Interrupted

    def handler(signum, frame):  # noqa: ARG001
        name = signal.Signals(signum).name
        raise Interrupted(f"stopped by {name} while {what}; finished work is kept; continue with --resume", name)

    with _handling(handler):
        yield


@contextmanager
def _handling(handler) -> Iterator[None]:
    """``handler`` for SIGTERM and SIGINT inside the block, the previous handlers restored after it.
    Outside the main thread no handler can be set: the block then runs without one."""
    try:
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:
        yield
        return
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
