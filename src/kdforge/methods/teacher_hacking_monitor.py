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
from kdforge.report.plots import COLORS, plt, png
from kdforge.tasks.lm_config import HackingMonitor


@register_method
class TeacherHackingMonitor(Method):
    """Proxy and golden distances in every evaluation, and a verdict on their curves."""

    name = "teacher_hacking_monitor"
    summary = (
        "Adds proxy_kl (to the teacher) and golden_kl or golden_nll (to a golden model) to every evaluation, and"
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

    @classmethod
    def report_html(cls, report, render):
        return render(_SECTION)

    @classmethod
    def report_figures(cls, report, run_dir):
        train = report["runs"][0]["models"].get("student", {}).get("train", {})
        return [("Teacher-hacking monitor: proxy and golden metrics (first seed)", hacking_curves(train))]


def hacking_curves(train: dict[str, Any]) -> bytes | None:
    """The monitor's proxy (distance to the teacher) and golden (to the golden model) metrics over steps."""
    hack = train.get("teacher_hacking")
    if not hack or not hack.get("steps"):
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(hack["steps"], hack["proxy_values"], marker="o", ms=3, color=COLORS["teacher"], label=hack["proxy"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"proxy: {hack['proxy']}")
    other = ax.twinx()
    other.plot(hack["steps"], hack["golden_values"], marker="s", ms=3, color=COLORS["student"], label=hack["golden"])
    other.set_ylabel(f"golden: {hack['golden']}")
    if hack.get("flagged"):
        ax.axvline(hack["golden_best_step"], color="#C44E52", ls="--", lw=1)
        ax.set_title("teacher hacking flagged: golden's best at the dashed line")
    else:
        ax.set_title("proxy and golden metrics (lower = closer)")
    lines = ax.get_lines() + other.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8)
    ax.grid(alpha=0.3)
    return png(fig)


_SECTION = """{% set hack = train.teacher_hacking %}
{% if hack %}
<h2>Teacher-hacking monitor (first seed)</h2>
{% if hack.flagged %}
<p class="verdict"><b>Teacher hacking flagged:</b> since step {{ hack.golden_best_step }} the proxy ({{ hack.proxy }})
 changed by {{ "%+.1f" | format(100 * hack.proxy_change) }}% while the golden metric ({{ hack.golden }}) changed by
 {{ "%+.1f" | format(100 * hack.golden_change) }}%. The student keeps moving toward the teacher and away from the golden model:
 use fresh generations each epoch (methods: [{name: online_generation}]), more prompts, or stop at step {{ hack.golden_best_step }}.</p>
{% elif hack.reason %}
<p>Not assessed: {{ hack.reason }}.</p>
{% else %}
<p>No teacher hacking: the golden metric ({{ hack.golden }}) did not rise while the proxy ({{ hack.proxy }}) fell
 (proxy {{ "%+.1f" | format(100 * hack.proxy_change) }}%, golden {{ "%+.1f" | format(100 * hack.golden_change) }}%
 since the golden's best, step {{ hack.golden_best_step }}).</p>
{% endif %}
{% endif %}"""  # noqa: E501 (HTML, kept as it renders)
