"""On-policy distillation (GKD, Agarwal et al. 2024): the student answers the prompts itself with probability
lambda per optimizer step, and the teacher scores its answers."""

import pytest
import torch

from kdforge.data.lm import collate_causal, encode_pairs
from kdforge.errors import RecipeError
from kdforge.methods import on_policy as on_policy_module
from kdforge.methods.on_policy import OnPolicy, OnPolicySettings, on_policy_at, student_batch
from kdforge.models.hf_causal_lm import load_causal_lm
from kdforge.runner import run_recipe
from kdforge.tasks.lm_generated import prompt_prefixes
from test_tasks_causal_lm import lm_recipe, task_of


def on_policy_recipe(out, teacher_ref, path, method="{name: on_policy}", *overrides, **sections):
    """The runs of test_lm_data_modes (JSONL pairs, 32 tokens), with the on_policy method listed."""
    return lm_recipe(
        out / "on_policy",
        teacher_ref,
        path,
        "data.format=jsonl",
        "data.max_length=32",
        "generation.max_new_tokens=10",
        f"methods=[{method}]",
        *overrides,
        **sections,
    )


def test_on_policy_draws_respect_lambda_and_repeat_for_the_same_step():
    steps = range(4000)
    assert not any(on_policy_at(s, lmbda=0.0, seed=0) for s in steps)
    assert all(on_policy_at(s, lmbda=1.0, seed=0) for s in steps)
    for lmbda in (0.1, 0.5, 0.8):
        share = sum(on_policy_at(s, lmbda=lmbda, seed=1) for s in steps) / len(steps)
        assert abs(share - lmbda) < 4 * (lmbda * (1 - lmbda) / len(steps)) ** 0.5  # within 4 standard errors
    assert [on_policy_at(s, lmbda=0.5, seed=7) for s in range(50)] == [
        on_policy_at(s, lmbda=0.5, seed=7) for s in range(50)
    ]


def test_a_student_batch_keeps_the_prompts_and_learns_only_the_students_answer(tiny_lm_teacher, lm_tokenizer):
    model = load_causal_lm(str(tiny_lm_teacher), field="t", fresh=True)
    pairs = [("To be or not", "that is"), ("Whether tis nobler in the mind", "to suffer")]
    examples = encode_pairs(lm_tokenizer, pairs, 32)
    batch = collate_causal(examples, 1)
    batch["example_index"] = torch.tensor([4, 9])
    prompts = prompt_prefixes(batch)
    assert [len(p) for p in prompts] == [int(e.counted.float().argmax()) for e in examples]
    cfg = OnPolicySettings(max_new_tokens=6)
    new = student_batch(model, batch, cfg, pad_id=1, stop_ids=[], max_length=32, seed=0)
    assert torch.equal(new["example_index"], batch["example_index"])
    for row, prompt in enumerate(prompts):
        assert new["input_ids"][row, : len(prompt)].tolist() == prompt
        learned = new["loss_mask"][row].nonzero().flatten()
        assert learned.tolist() == list(range(len(prompt) - 1, len(prompt) + 5))  # the 6 sampled tokens


def test_on_policy_runs_generate_with_probability_lambda_and_never_for_the_baseline(
    tmp_path, tiny_lm_teacher, pairs_file, monkeypatch, unchanged
):
    calls = []
    original = on_policy_module.student_batch

    def counting(model, batch, *args, **kwargs):
        calls.append(model.training)
        return original(model, batch, *args, **kwargs)

    monkeypatch.setattr(on_policy_module, "student_batch", counting)
    objective = [{"loss": "generalized_jsd", "params": {"beta": 0.5}}]
    for lmbda, expected in ((0.0, 0), (1.0, 6)):
        calls.clear()
        recipe = on_policy_recipe(
            tmp_path / str(lmbda), tiny_lm_teacher, pairs_file, f"{{name: on_policy, lambda: {lmbda}}}",
            objective=objective,
        )  # fmt: skip
        report = run_recipe(recipe)  # with a baseline, which trains on the file's answers only
        unchanged(recipe.run_dir, report, key=f"on_policy_lambda_{lmbda}")
        train = report["runs"][0]["models"]["student"]["train"]
        assert len(calls) == expected == train["on_policy_steps"] and train["on_policy_lambda"] == lmbda
        assert train["data_mode"] == "on_policy" and "on_policy_steps" not in report["runs"][0]["models"]["baseline"]
        html = (recipe.run_dir / "report.html").read_text()
        assert f"the student answered the prompts itself\n in {expected} of 6 optimizer steps (lambda {lmbda})" in html
    recipe = on_policy_recipe(tmp_path / "half", tiny_lm_teacher, pairs_file, "{name: on_policy, lambda: 0.5}")
    method = OnPolicy(OnPolicySettings(lmbda=0.5), task_of(recipe))
    assert method.training_info(6)["on_policy_steps"] == sum(on_policy_at(s, lmbda=0.5, seed=0) for s in range(6))


def test_a_cached_teacher_is_refused(tmp_path, tiny_lm_teacher, pairs_file):
    teacher = {"signal": "cache", "path": str(tmp_path / "c"), "model": str(tiny_lm_teacher)}
    with pytest.raises(RecipeError, match=r"teacher.signal: method on_policy \(methods\[0\]\) trains on text written"):
        on_policy_recipe(tmp_path, None, pairs_file, teacher=teacher)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.format=text"], r"methods\[0\]: on_policy needs prompts to answer: use data.format: jsonl"),
        (
            ["methods=[{name: on_policy}, {name: teacher_generated}]"],
            r"methods\[0\].name: on_policy and teacher_generated cannot be combined",
        ),
        (["methods=[{name: step_by_step}, {name: on_policy}]"], r"methods\[0\].name: step_by_step and on_policy"),
        (["teacher=null", "objective=[{loss: cross_entropy}]"], r"'on_policy' needs a teacher"),
    ],
)
def test_mistakes_are_refused_when_the_recipe_is_checked(tmp_path, tiny_lm_teacher, pairs_file, overrides, message):
    with pytest.raises(RecipeError, match=message):
        on_policy_recipe(tmp_path, tiny_lm_teacher, pairs_file, "{name: on_policy}", *overrides)


@pytest.mark.parametrize(
    "overrides", [["data.mode=on_policy"], ["data.on_policy={lambda: 0.5}"], ["data.on_policy.lambda=1.0"]]
)
def test_the_old_data_settings_are_refused_with_the_new_spelling(tmp_path, tiny_lm_teacher, pairs_file, overrides):
    message = r"^data.mode on_policy and data.on_policy moved to the recipe's methods list; write methods:"
    with pytest.raises(RecipeError, match=message + r" \[\{name: on_policy, lambda: 0.5, \.\.\.\}\]") as e:
        lm_recipe(tmp_path, tiny_lm_teacher, pairs_file, "data.format=jsonl", *overrides)
    assert "\n" not in str(e.value)
