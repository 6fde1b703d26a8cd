"""Fault injection for the reliability tests: kill this process at an exact point of a run.

A test that sends ``kill -9`` from outside hits a random instant, and the windows that
matter most (between two files of a checkpoint, during an evaluation) last milliseconds;
so the code calls :func:`point` at those places and, when ``KDFORGE_FAULT`` names one, the
process kills itself there with SIGKILL, exactly as a pre-empted machine would: no handler
runs, no file is closed. ``KDFORGE_FAULT=checkpoint@10`` dies while the checkpoint of step
10 is half-written; several points may be given, separated by commas. Unset (always, outside
the tests), :func:`point` is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

#: the places a run can be killed at, for the tests' tables
POINTS = ("step", "checkpoint", "eval", "save_model", "report", "cache_shard")


def point(name: str, step: int | None = None) -> None:
    """Die here (SIGKILL) if ``KDFORGE_FAULT`` names this point (``name`` or ``name@step``)."""
    wanted = os.environ.get("KDFORGE_FAULT")
    if not wanted:
        return
    for item in wanted.split(","):
        where, _, at = item.strip().partition("@")
        if where == name and (not at or (step is not None and int(at) == step)):
            os.kill(os.getpid(), signal.SIGKILL)
