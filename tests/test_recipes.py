"""Every bundled recipe runs end to end at tiny size."""

import pytest

from conftest import tiny
from kdforge.recipe import bundled_recipes
from kdforge.runner import run_recipe


@pytest.mark.parametrize("name", sorted(bundled_recipes()))
def test_bundled_recipe_runs_at_tiny_size(name, tmp_path, digits_teacher):
    recipe = tiny(name, tmp_path)
    extra = [f"teacher.model={digits_teacher}"] if recipe.teacher else []
    recipe = tiny(name, tmp_path, *extra)
    report = run_recipe(recipe)
    assert (recipe.run_dir / "report.html").is_file()
    assert (recipe.run_dir / "model" / "README.md").is_file()
    assert report["summary"]["student"]["metrics"]["accuracy"]["n"] == 1
