"""Sequence-level knowledge distillation: the teacher answers the training prompts once, before training.

Kim and Rush ("Sequence-Level Knowledge Distillation", EMNLP 2016) train the student on
the teacher's own outputs instead of the data's references. Here the recipe's writer
(``generation``: by default the teacher's model, or another local model, or an endpoint)
answers every prompt of the JSONL file once; the answers are stored, so ``kdforge cache``
can add their top-k log-probs and every later run reads the same set. A recipe (causal_lm)::

    data: {format: jsonl, path: prompts.jsonl}
    generation: {max_new_tokens: 64}
    methods: [{name: teacher_generated}]

The method hands the task a :class:`~kdforge.tasks.lm_generated.ResponseSource`
(:meth:`configure_task`), wherever a task is built for the recipe (a run, its seeds,
``kdforge cache``). Earlier recipes' ``data.mode: teacher_generated`` is refused with
this spelling.
"""

from __future__ import annotations

from kdforge.errors import RecipeError
from kdforge.methods.base import Method, register_method
from kdforge.provenance import Paper
from kdforge.recipe import Recipe
from kdforge.tasks.lm_config import records_layout
from kdforge.tasks.lm_generated import ResponseSource

SEQUENCE_KD = Paper("Sequence-Level Knowledge Distillation", 2016, "1606.07947", authors="Kim and Rush")

#: the methods that decide where the training responses come from: a recipe lists at most one of them
WRITE_RESPONSES = frozenset({"teacher_generated", "online_generation", "step_by_step", "on_policy"})


def check_prompts(recipe: Recipe, name: str, where: str) -> None:
    """A method whose teacher answers prompts needs a JSONL file of them."""
    data = recipe.data if isinstance(recipe.data, dict) else {}
    if not records_layout(data):
        raise RecipeError(
            f"{where}: {name} needs prompts to answer: use data.format: jsonl with a prompt per line,"
            " or a table with a prompt or messages column"
        )


@register_method
class TeacherGenerated(Method):
    """The training responses are the teacher's answers to the file's prompts, written once."""

    name = "teacher_generated"
    teacher_in_steps_only = True
    summary = (
        "Sequence-level KD: the teacher answers the training prompts once before training, and the student"
        " learns its answers (stored, so kdforge cache can add their top-k log-probs)"
    )
    paper = SEQUENCE_KD
    requires = frozenset({"writes_text"})
    excludes = WRITE_RESPONSES - {"teacher_generated"}

    @classmethod
    def check(cls, cfg, recipe: Recipe, where: str) -> None:
        check_prompts(recipe, cls.name, where)

    def configure_task(self, task) -> None:
        task.use_responses(ResponseSource(self.name, self.where))
