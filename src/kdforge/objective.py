"""The objective: a weighted sum of registered loss terms, each logged on its own.

Each term names a loss, the output field it compares, a weight and an optional
weight schedule. The objective does not know which task or model produced the
outputs; it only routes fields (and labels, for label losses) to loss functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from kdforge.errors import RecipeError
from kdforge.losses import LOSSES, LossSpec
from kdforge.outputs import ModelOutputs
from kdforge.recipe import ObjectiveTerm, TermSchedule


def schedule_factor(schedule: TermSchedule | None, step: int, total_steps: int) -> float:
    """Weight multiplier at ``step``: ``start`` -> ``end`` over ``schedule.steps`` (default: the run)."""
    if schedule is None:
        return 1.0
    span = schedule.steps or total_steps
    progress = min(max(step / max(span, 1), 0.0), 1.0)
    if schedule.shape == "constant":
        return schedule.start
    if schedule.shape == "cosine":
        progress = 0.5 * (1 - math.cos(math.pi * progress))
    return schedule.start + (schedule.end - schedule.start) * progress


@dataclass(frozen=True)
class BoundTerm:
    name: str
    index: int
    spec: LossSpec
    term: ObjectiveTerm


class Objective:
    """``objective(student_out, teacher_out, batch, step) -> (loss, {term name: value})``."""

    def __init__(self, terms: list[ObjectiveTerm], total_steps: int, names: list[str] | None = None):
        if not terms:
            raise RecipeError("objective: needs at least one term")
        names = names or [t.name or t.loss for t in terms]
        self.terms = [
            BoundTerm(name, i, LOSSES.get(t.loss, field=f"objective[{i}].loss"), t)
            for i, (name, t) in enumerate(zip(names, terms))
        ]
        self.total_steps = total_steps

    @property
    def student_fields(self) -> frozenset[str]:
        return frozenset(t.term.field for t in self.terms)

    @property
    def teacher_fields(self) -> frozenset[str]:
        return frozenset(t.term.field for t in self.terms if t.spec.target == "teacher")

    @property
    def needs_teacher(self) -> bool:
        return bool(self.teacher_fields)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def weights_at(self, step: int) -> dict[str, float]:
        return {t.name: t.term.weight * schedule_factor(t.term.schedule, step, self.total_steps) for t in self.terms}

    def __call__(
        self,
        student: ModelOutputs,
        teacher: ModelOutputs | None,
        batch: dict[str, Any],
        step: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weights = self.weights_at(step)
        mask = batch.get("loss_mask")
        total: torch.Tensor | None = None
        values: dict[str, torch.Tensor] = {}
        for bound in self.terms:
            term = bound.term
            if bound.spec.target == "labels":
                target = batch["labels"]
            else:
                assert teacher is not None, "the engine runs the teacher when a term needs it"
                target = teacher.get(term.field)
            extra = {"labels": batch["labels"]} if bound.spec.needs_labels else {}
            try:
                value = bound.spec.fn(student.get(term.field), target, mask=mask, **extra, **term.params)
            except (ValueError, TypeError) as exc:
                raise RecipeError(f"objective[{bound.index}] ({term.loss}): {exc}") from None
            values[bound.name] = value.detach()
            contribution = weights[bound.name] * value
            total = contribution if total is None else total + contribution
        assert total is not None
        return total, values

    # Schedules with state (TAID's t, adaptive temperatures) keep it here, so it is checkpointed.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return None
