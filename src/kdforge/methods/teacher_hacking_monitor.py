"""The teacher-hacking monitor: distances to the teacher (proxy) and to a golden model, every evaluation.

Tiapkin et al. ("On Teacher Hacking in Language Model Distillation", 2025) call it
teacher hacking when the student keeps getting closer to the teacher (the proxy) while
it moves away from the true distribution (a golden model). With this method every
evaluation of a student adds ``proxy_kl`` (KL from the teacher, on ``examples`` held-out
examples) and ``golden_kl`` (from ``golden``, a stronger model with the same tokenizer)
or ``golden_nll`` (on ``golden_data``, answers a golden model wrote); the run's training
info gets ``teacher_hacking``, the verdict of
:func:`kdforge.eval.hacking.detect_teacher_hacking` on those curves. A recipe::

    methods: [{name: teacher_hacking_monitor, golden: models/bigger, examples: 32}]

Earlier recipes' ``data.monitor`` is refused with this spelling.
"""

from __future__ import annotations

from typing import Any

from kdforge.eval.hacking import detect_teacher_hacking
from kdforge.methods.base import Method, register_method
from kdforge.methods.online_generation import TEACHER_HACKING
from kdforge.tasks.lm_config import HackingMonitor


@register_method
class TeacherHackingMonitor(Method):
    """Proxy and golden distances in every evaluation, and a verdict on their curves."""

    name = "teacher_hacking_monitor"
    summary = (
        "adds proxy_kl (to the teacher) and golden_kl or golden_nll (to a golden model) to every evaluation, and"
        " flags the run when the proxy keeps improving while the golden metric worsens"
    )
    paper = TEACHER_HACKING
    settings = HackingMonitor
    requires = frozenset({"writes_text"})
    needs_teacher = True

    def configure_task(self, task) -> None:
        task.monitor_teacher_hacking(self.cfg, self.where)

    def review_evaluations(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        monitor: HackingMonitor = self.cfg  # type: ignore[assignment]
        golden = "golden_kl" if monitor.golden is not None else "golden_nll"
        return {
            "teacher_hacking": detect_teacher_hacking(
                records, proxy="proxy_kl", golden=golden, patience=monitor.patience, tolerance=monitor.tolerance
            )
        }
