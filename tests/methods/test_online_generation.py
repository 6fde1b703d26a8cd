"""Online generation (Tiapkin et al. 2025, the teacher-hacking paper's remedy): the teacher answers the
training prompts afresh every epoch (``methods: [{name: online_generation}]``)."""

import json
from pathlib import Path

import pytest

from conftest import crash_at_step
from kdforge.errors import RecipeError
from kdforge.runner import run_recipe
from test_lm_data_modes import mode_recipe, responses_of
from test_tasks_causal_lm import lm_recipe, task_of


def test_the_old_data_setting_is_refused_with_the_new_spelling(tmp_path, tiny_lm_teacher, pairs_file):
    with pytest.raises(
        RecipeError,
        match=r"^data.mode online_generation moved to the recipe's methods list; "
        r"write methods: \[\{name: online_generation\}\]",
    ) as e:
        lm_recipe(tmp_path, tiny_lm_teacher, pairs_file, "data.format=jsonl", "data.mode=online_generation")
    assert "\n" not in str(e.value)


def test_it_needs_jsonl_prompts(tmp_path, tiny_lm_teacher):
    with pytest.raises(
        RecipeError, match=r"methods\[0\]: online_generation needs prompts to answer: use data.format: jsonl"
    ):
        lm_recipe(tmp_path, tiny_lm_teacher, tmp_path / "t.txt", "methods=[{name: online_generation}]")


def test_a_cached_teacher_is_refused(tmp_path, tiny_lm_teacher, pairs_file):
    teacher = {"signal": "cache", "path": str(tmp_path / "c"), "model": str(tiny_lm_teacher)}
    with pytest.raises(
        RecipeError, match=r"teacher.signal: method online_generation \(methods\[0\]\) trains on text written"
    ):
        mode_recipe(tmp_path, None, pairs_file, "online_generation", teacher=teacher)


def test_online_generation_writes_fresh_answers_each_epoch_and_resumes_to_the_same_run(
    tmp_path, tiny_lm_teacher, prompts_file, monkeypatch, unchanged
):
    # 36 training prompts, 8 per batch: 5 batches an epoch, 12 steps = epochs 0, 1 and 2
    args = ("evaluation.baseline=false", "training.steps=12", "training.checkpoint_every=4")
    recipe = mode_recipe(tmp_path, tiny_lm_teacher, prompts_file, "online_generation", *args)
    reference = run_recipe(recipe)
    unchanged(recipe.run_dir, reference)
    store = Path(tmp_path / "kdforge-cache" / "generations")
    keys = [json.loads(p.read_text()) for p in store.glob("*.key.json")]
    assert sorted(k["purpose"] for k in keys) == ["epoch-1", "epoch-2", "responses"]
    task = task_of(recipe)
    train = task.splits().train
    epochs = []
    for epoch in range(3):
        train.set_epoch(epoch)
        epochs.append(responses_of(task, train))
    assert epochs[0] != epochs[1] != epochs[2]  # fresh answers...
    assert [len(e) for e in epochs] == [36, 36, 36]  # ...to the same prompts

    crashed = mode_recipe(tmp_path / "again", tiny_lm_teacher, prompts_file, "online_generation", *args)
    crash_at_step(crashed, 7, monkeypatch)  # in epoch 1
    resumed = run_recipe(crashed, resume=True)
    student = resumed["runs"][0]["models"]["student"]
    assert student["train"]["resumed_from"] == 4
    assert student["metrics"] == reference["runs"][0]["models"]["student"]["metrics"]
