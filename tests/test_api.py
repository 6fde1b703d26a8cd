"""The Python entry point: kdforge.load_recipe and kdforge.run, and the README's example, executed."""

import re
from pathlib import Path

import pytest

import kdforge
from kdforge.errors import RecipeError

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    block = re.search(r"### In Python.*?```python\n(.*?)```", README.read_text(), flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    report = scope["report"]
    assert isinstance(report, kdforge.Report)
    assert report.html == tmp_path / "runs" / "python-example" / "report.html" and report.html.is_file()
    assert 0 < report.metric("student", "accuracy") <= 1
    assert report.student.joinpath("model.safetensors").is_file()


def test_a_mapping_a_name_and_a_recipe_load_the_same(tmp_path):
    by_name = kdforge.load_recipe("digits_kd", ["training.lr=0.01"])
    by_mapping = kdforge.load_recipe(by_name.model_dump(mode="json"))
    again = kdforge.load_recipe(by_mapping, {"training.lr": 0.02})
    assert by_mapping == by_name and again.training.lr == 0.02


def test_mistakes_raise_the_one_line_recipe_error():
    with pytest.raises(RecipeError, match=r"training.lr: must be > 0"):
        kdforge.load_recipe("digits_kd", {"training.lr": -1})
    with pytest.raises(AttributeError):
        kdforge.no_such_thing  # noqa: B018
