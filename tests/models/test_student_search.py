"""Student search (AutoDistil-style, for causal LMs): budgets, the candidate grid, sizes that match the students
the recipe then builds, and a search that keeps to its budget and writes its table."""

from __future__ import annotations

import json

import pytest
import torch

from kdforge.errors import KDForgeError
from kdforge.models.student_search import (
    Budget,
    Candidate,
    candidate_grid,
    count_params,
    parse_budget,
    spread,
)
from tiny_lm import TEXT, make_llama, save_llama


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [("60M", "params", 60e6), ("1.2B", "params", 1.2e9), ("500000", "params", 5e5), ("40ms", "latency", 0.04),
     ("0.5s", "latency", 0.5)],
)  # fmt: skip
def test_budgets_read_parameters_or_latency(text, kind, value):
    budget = parse_budget(text)
    assert budget.kind == kind and budget.value == pytest.approx(value)


def test_a_budget_that_is_neither_is_refused_with_the_fix():
    with pytest.raises(KDForgeError, match=r"--budget 60 apples: give parameters \(60M"):
        parse_budget("60 apples")


def test_the_grid_keeps_heads_per_key_value_group_and_has_no_duplicates():
    config = make_llama(300, layers=8, hidden=32).config
    grid = candidate_grid(config)
    keys = [(c.num_layers, c.heads, c.intermediate, c.hidden) for c in grid]
    assert len(keys) == len(set(keys))
    assert {c.heads for c in grid} == {4, 2}  # 4 query heads over 2 key/value heads
    assert {c.num_layers for c in grid} == {2, 3, 4}
    assert {c.intermediate for c in grid} == {64, 40, 24} and {c.hidden for c in grid} == {32, 24}


def test_spread_keeps_the_largest_and_reaches_the_smallest():
    ranked = [Candidate(10 - i, 4, 64, 32, params=100 - i) for i in range(10)]
    picked = spread(ranked, 4)
    assert picked[0] is ranked[0] and picked[-1] is ranked[-1] and len(picked) == 4


def _recipe(folder, teacher, *extra):
    from kdforge.checks import parse_recipe

    (folder / "text.txt").write_text(TEXT * 6)
    recipe = {
        "name": "search",
        "task": "causal_lm",
        "teacher": {"model": str(teacher)},
        "student": {"from_teacher": {"num_layers": 2}},
        "data": {"format": "text", "path": str(folder / "text.txt"), "max_length": 16, "samples": 0},
        "objective": [{"loss": "forward_kl", "weight": 1.0}],
        "training": {"batch_size": 4, "steps": 3, "lr": 1e-3},
        "evaluation": {"batch_size": 4, "throughput_batches": 1, "throughput_repeats": 1},
        "output": {"dir": str(folder / "runs")},
    }
    return parse_recipe(recipe, list(extra))


@pytest.fixture(scope="module")
def eight_layer_teacher(tmp_path_factory, lm_tokenizer):
    return save_llama(tmp_path_factory.mktemp("llama8"), lm_tokenizer, layers=8)


def test_a_candidates_student_section_builds_a_student_of_its_counted_size(tmp_path, eight_layer_teacher):
    from kdforge.commands import build_task

    recipe = _recipe(tmp_path, eight_layer_teacher)
    teacher = build_task(recipe).load_teacher(str(eight_layer_teacher))
    candidate = Candidate(num_layers=3, heads=2, intermediate=40, hidden=24)
    section = candidate.student_section(teacher.config)
    assert section == {
        "from_teacher": {"num_layers": 3, "select": "importance"},
        "prune": {"heads": 2, "intermediate": 40, "hidden": 24},
    }
    student = build_task(recipe.model_copy(update={"student": section})).build_student()
    assert sum(p.numel() for p in student.parameters()) == count_params(type(teacher), candidate.config(teacher.config))


def test_the_search_keeps_to_its_parameter_budget_and_writes_its_table(tmp_path, eight_layer_teacher):
    from kdforge.search import search_recipe

    recipe = _recipe(tmp_path, eight_layer_teacher)
    budget = Budget("params", 24_000)
    out = tmp_path / "search"
    rows = search_recipe(recipe, budget, out, candidates=3, train_best=1, steps=2, latency_repeats=1)
    assert len(rows) == 3 and all(r["params"] <= budget.value for r in rows)
    assert all(r["latency_ms"] > 0 and r["kl_at_start"] >= 0 and r["d_rel"] >= 0 for r in rows)
    trained = [r for r in rows if r.get("kl_after") is not None]
    assert len(trained) == 1 and trained[0] is rows[0]  # the distilled candidate ranks first
    assert (out / "runs" / "candidate-0" / "report.json").is_file()
    saved = json.loads((out / "search.json").read_text())
    assert saved["rows"] == rows and "| rank | candidate |" in (out / "search.md").read_text()


def test_the_search_keeps_to_a_latency_budget(tmp_path, eight_layer_teacher, monkeypatch):
    import kdforge.models.student_search as search_module
    from kdforge.search import search_recipe

    # latency measured for real is noisy: the test gives each candidate a latency by its size
    monkeypatch.setattr(
        search_module, "measure_latency", lambda cls, config, tokens, repeats: config.hidden_size * 1e-3
    )
    rows = search_recipe(
        _recipe(tmp_path, eight_layer_teacher), Budget("latency", 0.025), tmp_path / "s", candidates=20, train_best=0
    )
    assert rows and all(r["latency_ms"] <= 25 for r in rows)
    assert {r["candidate"].split("hidden ")[1] for r in rows} == {"24"}


def test_no_candidate_within_the_budget_says_the_smallest_size(tmp_path, eight_layer_teacher):
    from kdforge.search import search_recipe

    with pytest.raises(KDForgeError, match=r"no candidate fits 0.001M parameters; the smallest candidate \(2 layers"):
        search_recipe(_recipe(tmp_path, eight_layer_teacher), Budget("params", 1000), tmp_path / "s")


def test_the_command_refuses_other_tasks_and_bad_budgets(tmp_path, capsys):
    from kdforge.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["students", "search", "digits_kd", "--budget", "20k"])
    assert exit_info.value.code == 2
    assert "students search builds students of a causal LM" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["students", "search", "digits_kd", "--budget", "lots"])
    assert exit_info.value.code == 2


def test_a_candidate_config_is_a_model_transformers_builds():
    teacher = make_llama(300, layers=4, hidden=32)
    config = Candidate(2, 2, 24, 24).config(teacher.config)
    model = type(teacher)(config)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 300)
