import os
from pathlib import Path

import pytest

os.environ.setdefault("KDFORGE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kdforge.recipe import bundled_recipes, load_recipe  # noqa: E402
from kdforge.runner import run_recipe  # noqa: E402

#: overrides that shrink any bundled recipe to a few seconds
TINY = [
    "training.epochs=null",
    "training.steps=12",
    "training.checkpoint_every=5",
    "training.log_every=2",
    "evaluation.throughput_batches=1",
    "evaluation.throughput_repeats=1",
]


def tiny(name: str, out: Path, *extra: str):
    return load_recipe(name, [*TINY, f"output.dir={out}", *extra])


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> Path:
    """A tiny digits teacher, trained once per test session; returns its model folder."""
    out = tmp_path_factory.mktemp("teacher-runs")
    recipe = tiny("digits_teacher", out, "training.steps=60", "student.hidden=[64]")
    run_recipe(recipe)
    return recipe.run_dir / "model"


@pytest.fixture
def recipes() -> dict[str, Path]:
    return bundled_recipes()
