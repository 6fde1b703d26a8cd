"""The teacher-hacking monitor (Tiapkin et al. 2025): proxy and golden distances in every evaluation, and a
verdict on their curves (``methods: [{name: teacher_hacking_monitor, golden: ...}]``)."""

import pytest

from kdforge.errors import RecipeError
from kdforge.eval.hacking import detect_teacher_hacking
from kdforge.runner import run_recipe
from test_lm_data_modes import answers_recipe
from test_tasks_causal_lm import lm_recipe, write_jsonl
from tiny_lm import save_llama


def test_the_old_data_setting_is_refused_with_the_new_spelling(tmp_path, tiny_lm_teacher, pairs_file):
    with pytest.raises(
        RecipeError,
        match=r"^data.monitor moved to the recipe's methods list; "
        r"write methods: \[\{name: teacher_hacking_monitor, \.\.\.\}\]",
    ) as e:
        lm_recipe(tmp_path, tiny_lm_teacher, pairs_file, "data.format=jsonl", "data.monitor={golden_data: g.jsonl}")
    assert "\n" not in str(e.value)


def _records(proxy, golden):
    return [
        {"step": 10 * (i + 1), "eval": {"proxy_kl": p, "golden_kl": g}} for i, (p, g) in enumerate(zip(proxy, golden))
    ]


def test_the_monitor_flags_a_constructed_hacking_case_and_not_a_healthy_one():
    hacking = detect_teacher_hacking(
        _records([1.0, 0.8, 0.6, 0.5, 0.4, 0.35], [2.0, 1.8, 1.7, 1.75, 1.85, 1.95]),
        proxy="proxy_kl",
        golden="golden_kl",
    )
    assert hacking["flagged"] and hacking["golden_best_step"] == 30
    assert hacking["proxy_change"] < 0 < hacking["golden_change"]
    healthy = detect_teacher_hacking(
        _records([1.0, 0.8, 0.6, 0.5, 0.4, 0.35], [2.0, 1.8, 1.7, 1.65, 1.6, 1.58]),
        proxy="proxy_kl",
        golden="golden_kl",
    )
    assert not healthy["flagged"]
    # both worsen together (overfitting, not hacking); golden noise inside the tolerance
    both = detect_teacher_hacking(
        _records([0.5, 0.4, 0.5, 0.6], [2.0, 1.8, 1.9, 2.0]), proxy="proxy_kl", golden="golden_kl"
    )
    noise = detect_teacher_hacking(
        _records([1.0, 0.8, 0.6, 0.5], [2.0, 1.8, 1.801, 1.802]), proxy="proxy_kl", golden="golden_kl"
    )
    assert not both["flagged"] and not noise["flagged"]
    short = detect_teacher_hacking(_records([1.0, 0.8], [2.0, 2.1]), proxy="proxy_kl", golden="golden_kl")
    assert not short["flagged"] and "fewer than" in short["reason"]


def test_a_run_with_the_monitor_logs_proxy_and_golden_and_reports_them(
    tmp_path, tiny_lm_teacher, lm_tokenizer, pairs_file, unchanged
):
    golden = save_llama(tmp_path / "golden", lm_tokenizer, layers=2)
    recipe = answers_recipe(
        tmp_path,
        tiny_lm_teacher,
        pairs_file,
        f"methods=[{{name: teacher_hacking_monitor, golden: {golden}, examples: 4}}]",
        "training.eval_every=1",
        "training.steps=5",
    )
    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    models = report["runs"][0]["models"]
    hack = models["student"]["train"]["teacher_hacking"]
    # every eval_every steps, and once more at the end
    assert hack["steps"] == [1, 2, 3, 4, 5] and len(hack["proxy_values"]) == len(hack["golden_values"]) == 5
    assert all(v > 0 for v in hack["proxy_values"] + hack["golden_values"])
    assert "proxy_kl" in models["student"]["metrics"] and "proxy_kl" not in models["teacher"]["metrics"]
    html = (recipe.run_dir / "report.html").read_text()
    assert "Teacher-hacking monitor" in html


def test_the_monitor_can_score_golden_written_answers_instead_of_a_golden_model(
    tmp_path, tiny_lm_teacher, pairs_file, unchanged
):
    golden_data = write_jsonl(tmp_path / "golden.jsonl", [{"prompt": "To be", "response": "or not to be"}] * 3)
    recipe = answers_recipe(
        tmp_path,
        tiny_lm_teacher,
        pairs_file,
        f"methods=[{{name: teacher_hacking_monitor, golden_data: {golden_data}}}]",
        "training.eval_every=2",
    )
    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    hack = report["runs"][0]["models"]["student"]["train"]["teacher_hacking"]
    assert hack["golden"] == "golden_nll" and hack["steps"] == [2, 4, 6]
    with pytest.raises(RecipeError, match="exactly one of golden"):
        lm_recipe(
            tmp_path, tiny_lm_teacher, pairs_file, "data.format=jsonl", "methods=[{name: teacher_hacking_monitor}]"
        )
