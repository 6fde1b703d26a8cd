"""One module checks a recipe against the registries.

:mod:`kdforge.recipe` validates the shape of a recipe and imports nothing of kdforge;
here the names it gives are looked up: the modules under ``plugins:`` are imported (they
register their own components), the ``teacher`` section is validated by the schema of the
signal it names, ``student`` and ``data`` by the task's schemas, each objective term against
the loss registry, the task's outputs and the teacher, and ``methods`` against theirs.
:func:`load_recipe` and :func:`parse_recipe` do both steps; every command calls them.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kdforge.errors import RecipeError, first_line
from kdforge.losses.registry import MODULE_PARAM_ERRORS, LossModuleSpec, find_term_loss
from kdforge.objective import term_temperature
from kdforge.recipe import ObjectiveTerm, Recipe, find_recipe, read_raw, validate_schema, validation_error
from kdforge.signals import SignalConfig, teacher_config, teacher_members
from kdforge.tasks import TASKS


def load_recipe(ref: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The recipe at a path, or a bundled recipe by name, with ``--set`` overrides, checked."""
    path = find_recipe(ref)
    return parse_recipe(read_raw(path), overrides)


def parse_recipe(data: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Validate a raw recipe mapping (after ``--set`` overrides) against every schema."""
    recipe = validate_schema(data, overrides, teacher_config=teacher_config)
    check_recipe(recipe)
    return recipe


def check_data_files(recipe: Recipe) -> None:
    """The data files the recipe names exist (``kdforge validate``; a run finds the same while reading)."""
    data = TASKS.get(recipe.task, field="task").data_schema.model_validate(recipe.data)
    check = getattr(data, "check_files", None)
    if check is not None:
        check()


def check_recipe(recipe: Recipe) -> None:
    """Import the recipe's plugins, then check its names against the registries."""
    import_plugins(recipe.plugins)
    _check_against_registries(recipe)


_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def import_plugins(modules: list[str]) -> None:
    """Import the modules a recipe lists under ``plugins:`` (they register components as they load).

    These are the only modules a recipe can make kdforge import: every other name in it
    (task, loss, signal) is looked up in a registry, never imported from a dotted path.
    """
    for i, name in enumerate(modules):
        if not _MODULE_NAME.match(name):
            raise RecipeError(f"plugins[{i}]: {name!r} is not a module name; write it as package.module")
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise RecipeError(
                f"plugins[{i}]: cannot import {name} ({first_line(exc)}); install it or put it on PYTHONPATH"
            ) from None
        except Exception as exc:  # the plugin's own code failed while it loaded: the user's to fix
            raise RecipeError(
                f"plugins[{i}]: importing {name} failed ({exc.__class__.__name__}: {first_line(exc)}); fix the module"
            ) from None


def _check_against_registries(recipe: Recipe) -> None:
    """Names in the recipe must be registered components that fit together."""
    task_cls = TASKS.get(recipe.task, field="task")
    mistakes = []  # both sections' together: every wrong field at once
    validated = {}
    for section in ("student", "data"):
        schema = getattr(task_cls, f"{section}_schema")
        try:
            validated[section] = schema.model_validate(getattr(recipe, section))
        except ValidationError as exc:
            mistakes.append(str(validation_error(exc, (section,))))
    if mistakes:
        raise RecipeError("\n".join(mistakes))

    for i, term in enumerate(recipe.objective):
        where = f"objective[{i}]"
        spec = find_term_loss(term.loss, field=f"{where}.loss")
        if term.field not in task_cls.output_fields:
            raise RecipeError(
                f"{where}.field: task {recipe.task!r} has no output {term.field!r};"
                f" it offers {', '.join(task_cls.output_fields)}"
            )
        unknown = set(term.params) - spec.param_names()
        if unknown:
            name = sorted(unknown)[0]
            known = ", ".join(sorted(spec.param_names())) or "none"
            raise RecipeError(f"{where}.params.{name}: {term.loss!r} has no parameter {name!r}; known: {known}")
        missing = spec.required_param_names() - set(term.params)
        if missing:
            name = sorted(missing)[0]
            raise RecipeError(f"{where}.params.{name}: {term.loss!r} needs {name}; set it in the term's params")
        if isinstance(spec, LossModuleSpec):
            try:
                spec.check_params(term.params)
            except MODULE_PARAM_ERRORS as exc:
                raise RecipeError(f"{where}.params: {first_line(exc)}") from None
        if spec.target == "teacher" and recipe.teacher is None:
            raise RecipeError(
                f"{where}.loss: {term.loss!r} compares with the teacher, but the recipe has no teacher;"
                " set teacher.model or use a labels-only loss such as cross_entropy"
            )
        if spec.target == "teacher":
            _check_term_fits_teacher(recipe.teacher, term, spec, where)

    if recipe.output.dtype != "auto" and not task_cls.saves_dtype:
        raise RecipeError(f"output.dtype: the {recipe.task} task saves its models as they trained; remove output.dtype")
    task_cls.check_sections(recipe, validated["data"])

    from kdforge.methods.base import check_methods

    check_methods(recipe, task_cls.capabilities, recipe.task)


def _check_term_fits_teacher(teacher: SignalConfig, term: ObjectiveTerm, spec: Any, where: str) -> None:
    """Stored log-probs (a cache, a server) exist at one temperature and, for a server, only as logits."""
    for path, member in teacher_members(teacher):
        if member.topk_logits_only and term.field != "logits":
            raise RecipeError(
                f"{where}.field: a {member.signal} teacher ({path}) gives top-k logits only, not {term.field!r}"
            )
        held = member.stored_temperature()
        if held is not None and term.field == "logits":
            try:
                used = term_temperature(term)
            except (TypeError, ValueError):  # params are free-form: a list or a word reaches float()
                raise RecipeError(
                    f"{where}.params.temperature: must be a number, got {term.params.get('temperature')!r}"
                ) from None
            if used != held:
                raise RecipeError(
                    f"{where}.params.temperature: {used:g}, but {path} holds log-probs at temperature"
                    f" {held:g}; set them equal ({path}.temperature is what the cache is written at)"
                )
