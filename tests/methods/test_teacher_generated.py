"""Sequence-level KD (Kim and Rush 2016): the teacher answers the training prompts once, before training, and
the student learns its answers (``methods: [{name: teacher_generated}]``)."""

import json

import pytest
import torch

from conftest import PROMPTS
from kdforge.commands import write_recipe_caches
from kdforge.data import generate
from kdforge.errors import RecipeError
from kdforge.runner import run_recipe
from test_lm_data_modes import mode_recipe, responses_of
from test_tasks_causal_lm import lm_recipe, task_of


def test_the_old_data_setting_is_refused_with_the_new_spelling(tmp_path, tiny_lm_teacher, pairs_file):
    with pytest.raises(
        RecipeError,
        match=r"^data.mode teacher_generated moved to the recipe's methods list; "
        r"write methods: \[\{name: teacher_generated\}\]",
    ) as e:
        lm_recipe(tmp_path, tiny_lm_teacher, pairs_file, "data.format=jsonl", "data.mode=teacher_generated")
    assert "\n" not in str(e.value)


def test_it_needs_jsonl_prompts(tmp_path, tiny_lm_teacher):
    with pytest.raises(
        RecipeError, match=r"methods\[0\]: teacher_generated needs prompts to answer: use data.format: jsonl"
    ):
        lm_recipe(tmp_path, tiny_lm_teacher, tmp_path / "t.txt", "methods=[{name: teacher_generated}]")


def test_it_cannot_be_combined_with_another_method_that_writes_the_responses(tmp_path, tiny_lm_teacher, pairs_file):
    for other in ("online_generation", "step_by_step", "on_policy"):
        with pytest.raises(RecipeError, match=f"teacher_generated and {other} cannot be combined"):
            mode_recipe(
                tmp_path,
                tiny_lm_teacher,
                pairs_file,
                "teacher_generated",
                f"methods=[{{name: teacher_generated}}, {{name: {other}}}]",
            )


def test_teacher_generated_data_is_the_teachers_answers_with_prompts_masked(tmp_path, tiny_lm_teacher, prompts_file):
    # room for the answers re-tokenized: a random teacher's bytes may take more tokens as text
    recipe = mode_recipe(tmp_path, tiny_lm_teacher, prompts_file, "teacher_generated", "data.max_length=96")
    task = task_of(recipe)
    splits = task.splits()
    store_files = [f for f in task.data_files() if f.suffix == ".jsonl" and f != prompts_file]
    assert len(store_files) == 1
    stored = [json.loads(line)["response"] for line in store_files[0].read_text().splitlines()]
    assert len(stored) == len(splits.train) + len(splits.test)
    # every training example = the prompt (not learned) + the teacher's answer (learned)
    example = splits.train[0]
    prompt_length = int(example.counted.float().argmax())
    text = task.tokenizer.decode(example.input_ids[:prompt_length])
    assert any(p in text for p in PROMPTS) and "<|assistant|>" in text
    assert not example.counted[:prompt_length].any() and example.counted[prompt_length:].all()
    learned = [" ".join(r.split()) for r in responses_of(task, splits.train)]
    assert all(" ".join(r.split()) in learned for r in stored[: len(splits.train)] if r)

    # a second task (a later run, kdforge cache) reads them back instead of generating
    def no_generation(*args, **kwargs):
        raise AssertionError("generated again")

    generate.sample_continuations, saved = no_generation, generate.sample_continuations
    try:
        again = task_of(recipe).splits()
    finally:
        generate.sample_continuations = saved
    assert [torch.equal(a.input_ids, b.input_ids) for a, b in zip(again.train, splits.train)] == [True] * len(
        splits.train
    )


def test_teacher_generated_answers_cached_with_top_k_train_a_student(
    tmp_path, tiny_lm_teacher, prompts_file, unchanged
):
    cache = tmp_path / "cache"
    teacher = {"signal": "cache", "path": str(cache), "model": str(tiny_lm_teacher), "k": 8}
    recipe = mode_recipe(tmp_path, None, prompts_file, "teacher_generated", teacher=teacher)
    ((_, manifest),) = write_recipe_caches(recipe)
    assert manifest.examples == len(task_of(recipe).splits().train)
    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    student = report["runs"][0]["models"]["student"]
    assert student["train"]["data_mode"] == "teacher_generated" and student["metrics"]["perplexity"] > 1
    assert report["throughput_unit"] == "tokens/s"
    samples = report["runs"][0]["samples"]
    assert len(samples) == 3 and set(samples[0]) == {"prompt", "reference", "teacher", "student", "baseline"}
    html = (recipe.run_dir / "report.html").read_text()
    assert "Sample generations" in html and "tokens/s" in html


def test_a_teacher_cache_fingerprint_tells_who_wrote_the_responses(tmp_path, tiny_lm_teacher, prompts_file):
    # a cache of the file's responses, or of another method's, is not one of the teacher's own answers
    written = task_of(mode_recipe(tmp_path, tiny_lm_teacher, prompts_file, "teacher_generated"))
    assert written.data_identity() == {"responses": {"name": "teacher_generated", "step_by_step": None}}
    fresh = task_of(mode_recipe(tmp_path, tiny_lm_teacher, prompts_file, "online_generation"))
    assert fresh.data_identity()["responses"]["name"] == "online_generation"
    offline = task_of(lm_recipe(tmp_path, tiny_lm_teacher, prompts_file, "data.format=jsonl"))
    assert offline.data_identity() == {}
