"""Commands that need a recipe's task: they build it here, with its methods, and hand it to the layers below.

Signals and models never import the tasks, and tasks never import the methods; what they
do for a recipe's task (a run, ``kdforge cache`` writes the teacher's caches, ``kdforge
students rank`` ranks candidate students) gets the task from :func:`build_task`, which
lets every listed method set the task up (:meth:`kdforge.methods.base.Method.configure_task`:
where a causal LM's training responses come from) before the task makes its splits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdforge.errors import RecipeError
from kdforge.methods import build_methods
from kdforge.models.diswot import Init, Ranked, rank_candidates, sample_batch
from kdforge.recipe import Recipe
from kdforge.signals.cache_run import write_caches
from kdforge.signals.cache_store import Manifest
from kdforge.tasks.base import TASKS, Task


def build_task(recipe: Recipe) -> Task:
    """The recipe's task, from the task registry, set up by each of the recipe's methods."""
    task = TASKS.get(recipe.task, field="task")(recipe)
    for method in build_methods(recipe, task):
        method.configure_task(task)
    return task


def write_recipe_caches(recipe: Recipe, **options: Any) -> list[tuple[Path, Manifest]]:
    """``kdforge cache``: write every cache the recipe's teacher reads (or, for an online teacher, one at
    ``output``), with the task its methods configured; ``options`` are
    :func:`~kdforge.signals.cache_run.write_caches`'s (k, dtype, output, temperature, batch_size,
    shard_examples, overwrite).

    A cache teacher's settings come from the recipe; a flag that contradicts them is
    refused, since the run would then refuse the cache.
    """
    return write_caches(recipe, build_task, **options)


def rank_recipe(recipe: Recipe, batch_size: int = 64, seed: int = 0, init: Init = "gaussian") -> list[Ranked]:
    """Rank ``recipe.candidates`` for ``recipe.teacher.model`` on one training batch (``kdforge students rank``)."""
    if not recipe.candidates:
        raise RecipeError(
            "candidates: the recipe lists no candidate students; add e.g. `candidates: [{hidden: [16]},"
            " {hidden: [64, 32]}]` (each entry a partial student section)"
        )
    teacher_cfg = recipe.teacher
    model_ref = getattr(teacher_cfg, "model", None)
    if teacher_cfg is None or teacher_cfg.signal not in ("online", "cache") or model_ref is None:
        raise RecipeError(
            "teacher.model: ranking students compares them with one local teacher model, and the recipe names"
            " none; set teacher.model (a served or ensemble teacher gives no features to compare)"
        )
    task = build_task(recipe)
    batch = sample_batch(task, batch_size, seed)
    return rank_candidates(task, task.load_teacher(model_ref), recipe.candidates, batch, seed, init)
