"""Distilling step-by-step: the teacher writes a rationale and an answer; the student learns both tasks.

Hsieh et al. ("Distilling Step-by-Step! Outperforming Larger Language Models with Less
Training Data and Smaller Model Sizes", Findings of ACL 2023) ask the teacher for a
rationale and an answer to each prompt, and train the student on two tasks: the answer
after ``label_prefix`` + prompt, the rationale after ``rationale_prefix`` + prompt. The
batch carries ``label_mask`` and ``rationale_mask`` for the objective's terms; only the
label task is evaluated (perplexity and ``answer_accuracy``), and the baseline learns the
answers alone. A recipe (causal_lm, JSONL prompts)::

    methods: [{name: step_by_step, label_source: teacher}]
    objective:
      - {loss: cross_entropy, mask: label_mask, name: label}
      - {loss: cross_entropy, mask: rationale_mask, weight: 0.5, name: rationale}

The recipe's writer (``generation``, by default the teacher) writes the rationales.
Earlier recipes' ``data.step_by_step`` is refused with this spelling.
"""

from __future__ import annotations

from kdforge.methods.base import Method, register_method
from kdforge.methods.teacher_generated import WRITE_RESPONSES, check_prompts
from kdforge.provenance import Paper
from kdforge.recipe import Recipe
from kdforge.tasks.lm_config import StepByStep as StepByStepSettings
from kdforge.tasks.lm_generated import ResponseSource

DISTILLING_STEP_BY_STEP = Paper(
    "Distilling Step-by-Step! Outperforming Larger Language Models with Less Training Data and Smaller Model Sizes",
    2023,
    "2305.02301",
    authors="Hsieh et al.",
)


@register_method
class StepByStep(Method):
    """The teacher's rationales and answers, learned as two prefixed tasks."""

    name = "step_by_step"
    teacher_in_steps_only = True
    summary = (
        "The teacher writes a rationale and an answer to each prompt; the student learns both, as two prefixed"
        " tasks (label_mask, rationale_mask), and is evaluated on the answers"
    )
    paper = DISTILLING_STEP_BY_STEP
    settings = StepByStepSettings
    requires = frozenset({"writes_text"})
    excludes = WRITE_RESPONSES - {"step_by_step"}

    @classmethod
    def check(cls, cfg, recipe: Recipe, where: str) -> None:
        check_prompts(recipe, cls.name, where)

    def configure_task(self, task) -> None:
        # the report keeps calling the data offline (a fixed set, as before step_by_step was a method)
        source = ResponseSource(self.name, self.where, step_by_step=self.cfg, data_mode="offline")  # type: ignore[arg-type]
        task.use_responses(source)

    @classmethod
    def report_html(cls, report, render):
        return render(_SECTION)


_SECTION = """{% if train.step_by_step %}
<p>Distilling step-by-step: {{ train.step_by_step.usable }} of {{ train.step_by_step.written }} teacher responses
 had a rationale and an answer.</p>
{% endif %}"""
