"""The recipe a model card and the report show is the run as carried out: a baseline only where one ran."""

import json

import yaml

from conftest import tiny
from kdforge.runner import run_recipe


def card_recipe(card: str) -> dict:
    """The YAML under the card's "## Recipe" heading."""
    start = card.index("```yaml\n", card.index("## Recipe")) + len("```yaml\n")
    return yaml.safe_load(card[start : card.index("\n```", start)])


def test_a_run_with_no_teacher_shows_no_baseline_though_the_recipe_asked_for_one(tmp_path):
    # training a teacher: nothing to distil from, so no labels-only baseline is trained, whatever
    # evaluation.baseline says (the default, true)
    recipe = tiny("digits_teacher", tmp_path, "training.steps=3")
    assert recipe.evaluation.baseline is True
    report = run_recipe(recipe)
    assert "baseline" not in report["runs"][0]["models"]
    shown = card_recipe((recipe.run_dir / "model" / "README.md").read_text())
    assert shown["evaluation"]["baseline"] is False
    assert shown["training"]["steps"] == 3 and shown["name"] == recipe.name  # the rest as given
    assert json.loads((recipe.run_dir / "report.json").read_text())["recipe"]["evaluation"]["baseline"] is False
    # the run folder's recipe.yaml stays as given: --resume compares the recipe given again with it
    assert yaml.safe_load((recipe.run_dir / "recipe.yaml").read_text())["evaluation"]["baseline"] is True


def test_a_distillation_with_its_baseline_off_shows_it_off_and_with_it_on_shows_it_on(tmp_path, digits_teacher):
    for baseline in (False, True):
        recipe = tiny(
            "digits_kd",
            tmp_path / str(baseline),
            f"teacher.model={digits_teacher}",
            "training.steps=3",
            f"evaluation.baseline={str(baseline).lower()}",
        )
        report = run_recipe(recipe)
        assert ("baseline" in report["runs"][0]["models"]) is baseline
        for folder in ("model", "baseline") if baseline else ("model",):
            shown = card_recipe((recipe.run_dir / folder / "README.md").read_text())
            assert shown["evaluation"]["baseline"] is baseline
