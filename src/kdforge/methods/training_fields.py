"""The output fields a training step asks of the student and of the teacher.

Shared by the runner's loss function and ``kdforge plan``'s probe, so the plan measures the path the
run takes (the fused linear path's ``HEAD_LOGITS`` included). Here, beside :class:`Method`, because a
method that changes the teacher's outputs keeps the teacher's logits whole.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kdforge.methods.base import Method
from kdforge.outputs import HEAD_LOGITS
from kdforge.signals.online import OnlineTeacher

if TYPE_CHECKING:
    from kdforge.objective import Objective
    from kdforge.signals import TeacherSignal
    from kdforge.tasks import Task


def training_fields(
    task: Task, objective: Objective, signal: TeacherSignal | None, methods: list[Method] = ()
) -> tuple[frozenset[str], frozenset[str]]:
    """(student fields, teacher fields) of one training step of ``objective`` on ``task``."""
    student_fields, teacher_fields = objective.student_fields, objective.teacher_fields
    if objective.head_logits and task.recipe.training.fused_linear:
        # the fused linear path: the logits are never computed whole. The teacher's too, when it is one
        # local model whose outputs no method changes (an ensemble averages, a cache stores top-k)
        student_fields = student_fields | {HEAD_LOGITS}
        unchanged = all(type(m).teacher_outputs is Method.teacher_outputs for m in methods)
        if isinstance(signal, OnlineTeacher) and unchanged:
            teacher_fields = teacher_fields | {HEAD_LOGITS}
    return student_fields, teacher_fields
