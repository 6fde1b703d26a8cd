"""`kdforge fields TASK`: every field a recipe can set, generated from the schemas."""

import types
import typing

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from kdforge.cli import app, main
from kdforge.docs_tables import method_registry
from kdforge.recipe import Recipe
from kdforge.signals import SIGNALS
from kdforge.tasks import TASKS

runner = CliRunner()


def fields_output(*args) -> list[str]:
    result = runner.invoke(app, ["fields", *args])
    assert result.exit_code == 0, result.output
    return result.stdout.splitlines()


def line_of(lines: list[str], path: str) -> str:
    found = [line for line in lines if line.split() and line.split()[0] == path]
    assert len(found) >= 1, f"{path} is not listed"
    return found[0]


def models_in(annotation) -> list[tuple[type[BaseModel], str]]:
    """The models a field holds, each with the path suffix of one item (``[i]`` in a list)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, "")]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return [found for arg in args for found in models_in(arg)]
    if origin is list:
        return [(model, "[i]" + suffix) for model, suffix in models_in(args[0])] if args else []
    return []


def paths(model: type[BaseModel], prefix: str) -> list[str]:
    out = []
    for name, info in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        out.append(path)
        for nested, suffix in models_in(info.annotation):
            out.extend(paths(nested, path + suffix))
    return out


def test_text_classification_names_max_length_with_its_default_and_description_and_training_steps():
    lines = fields_output("text_classification")
    info = TASKS.get("text_classification").data_schema.model_fields["max_length"]
    line = line_of(lines, "data.max_length")
    assert f" {info.default} " in line and line.endswith(" ".join(info.description.split()))
    steps = line_of(lines, "training.steps")
    assert "null" in steps and "optimizer steps" in steps
    assert line_of(lines, "evaluation.baseline").split()[1:3] == ["bool", "true"]


@pytest.mark.parametrize("task", ["text_classification", "classification"])
def test_every_field_of_the_schemas_is_listed(task):
    listed = {line.split()[0] for line in fields_output(task) if line.startswith("  ")}
    task_cls = TASKS.get(task)
    expected = paths(Recipe, "")
    expected += paths(task_cls.student_schema, "student") + paths(task_cls.data_schema, "data")
    for _, signal in SIGNALS.items():
        expected += paths(signal.config, "teacher")
    for _, cls in method_registry().items():
        if cls.requires <= task_cls.capabilities:
            expected += ["methods[i].name", *paths(cls.settings, "methods[i]")]
    missing = [path for path in expected if path not in listed]
    assert not missing
    assert "objective[i].schedule.shape" in listed and "training.optimizer.name" in listed


def test_without_a_task_the_common_sections_and_the_tasks_are_listed():
    lines = fields_output()
    listed = {line.split()[0] for line in lines if line.startswith("  ")}
    assert "training.lr" in listed and not any(path.startswith("data.") for path in listed)
    assert "text_classification" in lines[-1]


def test_an_unknown_task_is_one_line_listing_the_tasks(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fields", "nope"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: TASK: unknown task 'nope'; known: ")
    assert all(name in err[0] for name in TASKS)


def test_validate_help_names_the_fields_command():
    result = runner.invoke(app, ["validate", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "kdforge fields TASK" in result.stdout
