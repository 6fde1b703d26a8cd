"""The Python entry point, for notebooks and scripts: what ``kdforge run`` does, as two calls.

>>> import kdforge
>>> recipe = kdforge.load_recipe("digits_kd", {"training.steps": 20, "output.dir": "runs"})  # doctest: +SKIP
>>> report = kdforge.run(recipe)  # doctest: +SKIP
>>> report.metric("student", "accuracy"), report.html  # doctest: +SKIP

A recipe is a path, the name of a bundled recipe, or a mapping with the same sections as
the YAML file; overrides are ``--set`` assignments, as a list (``["training.lr=3e-4"]``)
or a mapping (``{"training.lr": 3e-4}``). Mistakes raise :class:`kdforge.errors.RecipeError`
(or another :class:`~kdforge.errors.KDForgeError`) with the same one-line message the
command line prints.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdforge.checks import load_recipe as _load_file
from kdforge.checks import parse_recipe
from kdforge.recipe import Recipe


def _assignments(overrides: Mapping[str, Any] | list[str] | tuple[str, ...] | None) -> list[str]:
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        # values as YAML flow, so that lists and mappings survive (`objective`, `student`)
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    return list(overrides)


def load_recipe(
    recipe: str | Path | Mapping[str, Any] | Recipe,
    overrides: Mapping[str, Any] | list[str] | tuple[str, ...] | None = None,
) -> Recipe:
    """A checked recipe from a file, a bundled recipe's name, or a mapping, with ``overrides`` applied."""
    sets = _assignments(overrides)
    if isinstance(recipe, Recipe):
        return parse_recipe(recipe.model_dump(mode="json"), sets)
    if isinstance(recipe, Mapping):
        return parse_recipe(dict(recipe), sets)
    return _load_file(recipe, sets)


@dataclass
class Report:
    """What a run reports (``report.json`` as ``data``), with the run folder and the page to open."""

    data: dict[str, Any]
    run_dir: Path

    @property
    def html(self) -> Path:
        """report.html: teacher, student and baseline side by side, with plots."""
        return self.run_dir / "report.html"

    @property
    def summary(self) -> dict[str, Any]:
        """Per role (teacher, student, baseline): metrics as mean and std over seeds, size, speed."""
        return self.data["summary"]

    def metric(self, role: str, name: str | None = None) -> float:
        """The mean over seeds of ``role``'s metric ``name`` (default: the task's primary metric)."""
        name = name or self.data["primary_metric"]
        return self.summary[role]["metrics"][name]["mean"]

    @property
    def student(self) -> Path:
        """The saved student's folder (the first seed's, under several seeds)."""
        runs = self.data["runs"]
        return self.run_dir / ("model" if len(runs) == 1 else f"seed-{runs[0]['seed']}/model")

    def __getitem__(self, key: str) -> Any:
        return self.data[key]


def run(
    recipe: str | Path | Mapping[str, Any] | Recipe,
    overrides: Mapping[str, Any] | list[str] | tuple[str, ...] | None = None,
    *,
    resume: bool = False,
    seeds: list[int] | None = None,
) -> Report:
    """Train the student (and the no-distillation baseline), evaluate teacher, student and baseline, and
    write the run folder; returns its :class:`Report`."""
    from kdforge.runner import run_recipe

    checked = load_recipe(recipe, overrides) if overrides or not isinstance(recipe, Recipe) else recipe
    data = run_recipe(checked, resume=resume, seeds=seeds)
    return Report(data, checked.run_dir.resolve())
