"""Online generation: the teacher answers the training prompts afresh every epoch.

Tiapkin et al. ("On Teacher Hacking in Language Model Distillation", 2025) find that a
student trained long on a fixed offline set of teacher answers learns the teacher's
quirks at the expense of the true distribution ("teacher hacking"), and that fresh
answers each epoch avoid it. Epoch 0 trains on the answers written before training
(as :mod:`kdforge.methods.teacher_generated`); every later epoch on new ones, stored
per epoch, so a resumed run reads the same data. A recipe (causal_lm)::

    data: {format: jsonl, path: prompts.jsonl}
    generation: {max_new_tokens: 64}
    methods: [{name: online_generation}]

The teacher scores text written during the run, which no cache holds: it must run
(online or served). Earlier recipes' ``data.mode: online_generation`` is refused with
this spelling.
"""

from __future__ import annotations

from kdforge.errors import RecipeError
from kdforge.methods.base import Method, register_method
from kdforge.methods.teacher_generated import WRITE_RESPONSES, check_prompts
from kdforge.provenance import Paper
from kdforge.recipe import Recipe
from kdforge.signals import CacheTeacherConfig, teacher_members
from kdforge.tasks.lm_generated import ResponseSource

TEACHER_HACKING = Paper(
    "On Teacher Hacking in Language Model Distillation", 2025, "2502.02671", authors="Tiapkin et al."
)


@register_method
class OnlineGeneration(Method):
    """The training responses are the teacher's answers, written afresh for each epoch."""

    name = "online_generation"
    summary = (
        "The teacher answers the training prompts afresh every epoch (the teacher-hacking paper's remedy for a"
        " fixed offline set)"
    )
    paper = TEACHER_HACKING
    requires = frozenset({"writes_text"})
    excludes = WRITE_RESPONSES - {"online_generation"}

    @classmethod
    def check(cls, cfg, recipe: Recipe, where: str) -> None:
        check_prompts(recipe, cls.name, where)
        # the teacher writes text during the run, which no cache holds: the teacher must run on it
        for path, member in teacher_members(recipe.teacher):
            if isinstance(member, CacheTeacherConfig):
                raise RecipeError(
                    f"{path}.signal: method online_generation ({where}) trains on text written during the run,"
                    " which no cache holds; use signal: online (or served), or the teacher_generated method with"
                    " the cache"
                )

    def configure_task(self, task) -> None:
        task.use_responses(ResponseSource(self.name, self.where, fresh_each_epoch=True))
