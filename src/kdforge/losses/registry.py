"""The loss registry: recipe names -> pure loss functions.

Every loss follows one contract (DESIGN.md):
``fn(student, teacher, *, mask=None, temperature=1.0, **params) -> scalar tensor``.
``target`` says what the second argument is: the teacher's output of the same
field (``"teacher"``) or the batch's labels (``"labels"``), so the objective knows
what to pass without knowing the loss. A teacher loss that also needs the labels
(decoupled KD) sets ``needs_labels`` and receives them as ``labels=``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from kdforge.registry import Registry

LossFn = Callable[..., "object"]


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: LossFn
    target: Literal["teacher", "labels"]
    summary: str
    needs_labels: bool = False

    def param_names(self) -> set[str]:
        """Keyword parameters a recipe may set in ``params``."""
        sig = inspect.signature(self.fn)
        return {
            p.name
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("mask", "labels")
        }


LOSSES: Registry[LossSpec] = Registry("loss")


def register_loss(name: str, *, target: Literal["teacher", "labels"] = "teacher", needs_labels: bool = False):
    """Register ``fn`` under ``name``; its docstring's first line is its summary."""

    def decorate(fn: LossFn) -> LossFn:
        summary = (inspect.getdoc(fn) or "").strip().splitlines()[0] if fn.__doc__ else name
        LOSSES.add(name, LossSpec(name=name, fn=fn, target=target, summary=summary, needs_labels=needs_labels))
        return fn

    return decorate
