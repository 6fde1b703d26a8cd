"""Distilling step-by-step (Hsieh et al. 2023): the teacher writes a rationale and an answer, the student
learns both as two prefixed tasks (``methods: [{name: step_by_step}]``)."""

from types import SimpleNamespace

import pytest
import torch

from kdforge.errors import RecipeError
from kdforge.runner import run_recipe
from kdforge.tasks import lm_generated
from kdforge.tasks.lm_generated import split_rationale
from test_tasks_causal_lm import lm_recipe, task_of


def test_the_old_data_setting_is_refused_with_the_new_spelling(tmp_path, tiny_lm_teacher, pairs_file):
    with pytest.raises(
        RecipeError,
        match=r"^data.step_by_step moved to the recipe's methods list; "
        r"write methods: \[\{name: step_by_step, \.\.\.\}\]",
    ) as e:
        lm_recipe(tmp_path, tiny_lm_teacher, pairs_file, "data.format=jsonl", "data.step_by_step={}")
    assert "\n" not in str(e.value)


def test_it_needs_jsonl_prompts(tmp_path, tiny_lm_teacher):
    with pytest.raises(
        RecipeError, match=r"methods\[0\]: step_by_step needs prompts to answer: use data.format: jsonl"
    ):
        lm_recipe(tmp_path, tiny_lm_teacher, tmp_path / "t.txt", "methods=[{name: step_by_step}]")


def test_a_step_by_step_answer_is_split_at_the_last_answer_line():
    assert split_rationale("Sheep eat grass, so yes.\nAnswer: yes") == ("Sheep eat grass, so yes.", "yes")
    assert split_rationale("a: b. answer: first\nANSWER:  no \nmore") == ("a: b. answer: first", "no")
    assert split_rationale("no answer line here") == ("no answer line here", None)
    assert split_rationale("Answer:") == ("", None)


def test_step_by_step_trains_two_prefixed_tasks_and_evaluates_only_the_label_task(
    tmp_path, tiny_lm_teacher, prompts_file, monkeypatch, unchanged
):
    def teacher_says(self, prompt_ids, *, purpose, description):
        return [f"because reason {i}. Answer: {'yes' if i % 2 else 'no'}" for i in range(len(prompt_ids))]

    monkeypatch.setattr(lm_generated.ResponseWriter, "responses", teacher_says)
    objective = [
        {"loss": "cross_entropy", "mask": "label_mask", "name": "label"},
        {"loss": "cross_entropy", "mask": "rationale_mask", "weight": 0.5, "name": "rationale"},
    ]
    recipe = lm_recipe(
        tmp_path,
        tiny_lm_teacher,
        prompts_file,
        "data.format=jsonl",
        "data.max_length=64",
        "methods=[{name: step_by_step}]",
        objective=objective,
    )
    task = task_of(recipe)
    splits = task.splits()
    kinds = [e.kind for e in splits.train]
    assert kinds.count("label") == kinds.count("rationale") == 36
    assert {e.kind for e in splits.test} == {"label"}
    batch = task.collate([splits.train[0], splits.train[36]])
    assert batch["label_mask"][0].any() and not batch["label_mask"][1].any()
    assert batch["rationale_mask"][1].any() and not batch["rationale_mask"][0].any()
    assert torch.equal(batch["label_mask"] | batch["rationale_mask"], batch["loss_mask"])
    texts = task.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert texts[0].startswith("label: To be") and texts[1].startswith("rationale: To be")
    assert task._references(batch)[0] in ("yes", "no") and task._references(batch)[1].startswith("because reason")

    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    student = report["runs"][0]["models"]["student"]
    assert set(student["train"]["final_terms"]) == {"label", "rationale"}
    assert 0 <= student["metrics"]["answer_accuracy"] <= 1
    assert student["train"]["step_by_step"] == {"written": 40, "usable": 40}
    assert task.baseline_objective()[0].mask == "label_mask"

    # answer_accuracy compares greedy answers with the references, spaces and case aside
    def answers(model, batch, max_new_tokens):
        references = task._references(batch)
        return references, [f"  {r.upper()} " if i % 2 else r for i, r in enumerate(references)]

    model = SimpleNamespace(config=SimpleNamespace(vocab_size=len(task.tokenizer)))  # only its size is read
    monkeypatch.setattr(task.evaluator, "_greedy", answers)
    assert task._answer_accuracy(model, splits.test) == 1.0
    monkeypatch.setattr(task.evaluator, "_greedy", lambda model, batch, n: ([], ["maybe"] * len(batch["labels"])))
    assert task._answer_accuracy(model, splits.test) == 0.0
