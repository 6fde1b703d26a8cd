"""Experiment trackers through Accelerate: used when installed and asked for."""

import pytest

from kdforge.errors import KDForgeError


def test_tracker_that_is_not_installed_is_a_user_error(tmp_path):
    import importlib.util

    from kdforge.engine.trainer import make_accelerator
    from kdforge.recipe import TrainingConfig

    if importlib.util.find_spec("mlflow") is not None:
        pytest.skip("mlflow is installed here")
    with pytest.raises(KDForgeError, match="pip install mlflow"):
        make_accelerator(TrainingConfig(steps=1, trackers=["mlflow"]), tmp_path)


def test_tensorboard_tracker_writes_events(tmp_path, digits_teacher):
    pytest.importorskip("tensorboard", reason="tensorboard is in the test extras")
    from conftest import tiny
    from kdforge.runner import run_recipe

    recipe = tiny(
        "digits_kd",
        tmp_path,
        f"teacher.model={digits_teacher}",
        "training.trackers=[tensorboard]",
        "evaluation.baseline=false",
    )
    run_recipe(recipe)
    assert list(recipe.run_dir.rglob("events.out.tfevents.*"))
