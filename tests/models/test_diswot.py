"""DisWOT: the distances against float64 references, ranking, and `kdforge students rank`."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from kdforge.checks import load_recipe
from kdforge.cli import app, main
from kdforge.errors import RecipeError
from kdforge.models.diswot import (
    class_gradient_map,
    diswot_score,
    gaussian_init_,
    merge_section,
    rank_candidates,
    relation_distance,
    sample_batch,
    semantic_distance,
)
from kdforge.outputs import ModelOutputs
from kdforge.tasks import TASKS
from kdforge.tasks.classification import ClassificationTask


def _normalised_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Each row divided by its L2 norm, one row at a time (zero rows stay zero)."""
    out = matrix.clone()
    for i in range(matrix.shape[0]):
        norm = math.sqrt(sum(float(v) ** 2 for v in matrix[i]))
        if norm > 0:
            out[i] = matrix[i] / norm
    return out


def _gram_distance_reference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||N(A Aᵀ) - N(B Bᵀ)||²_F / n², in float64."""
    a, b = a.double(), b.double()
    diff = _normalised_rows(a @ a.T) - _normalised_rows(b @ b.T)
    return float((diff**2).sum()) / a.shape[0] ** 2


def test_class_gradient_map_is_the_head_weight_gradient_of_mean_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(12, 7)
    labels = torch.randint(0, 5, (12,))
    head = nn.Linear(7, 5)
    logits = head(hidden)
    F.cross_entropy(logits, labels).backward()
    closed_form = class_gradient_map(hidden, logits.detach(), labels)
    assert closed_form.shape == (5, 7)
    torch.testing.assert_close(closed_form, head.weight.grad, rtol=1e-5, atol=1e-6)


def test_relation_distance_is_zero_for_identical_features_and_ignores_scale():
    torch.manual_seed(1)
    f_t, f_s = torch.randn(16, 32), torch.randn(16, 8)
    assert float(relation_distance(f_t, f_t)) == pytest.approx(0.0, abs=1e-7)
    assert float(relation_distance(f_t, 7.5 * f_t)) == pytest.approx(0.0, abs=1e-7)
    scaled = relation_distance(3.0 * f_t, 0.01 * f_s)
    torch.testing.assert_close(scaled, relation_distance(f_t, f_s), rtol=1e-5, atol=1e-7)


def test_relation_distance_matches_a_float64_reference_across_widths():
    torch.manual_seed(2)
    f_t, f_s = torch.randn(10, 24), torch.relu(torch.randn(10, 6))
    expected = _gram_distance_reference(f_t, f_s)
    assert expected > 0
    assert float(relation_distance(f_t, f_s)) == pytest.approx(expected, rel=1e-5)


def test_semantic_distance_paper_form_matches_a_float64_hand_computation():
    torch.manual_seed(3)
    g_t, g_s = torch.randn(4, 6), torch.randn(4, 6)
    g_s[1, 2] = 0.0  # a zero entry gives a zero row of g gᵀ, which must stay zero, not NaN
    classes, width = g_t.shape
    total = 0.0
    for k in range(classes):
        a, b = g_t[k].double(), g_s[k].double()
        diff = _normalised_rows(torch.outer(a, a)) - _normalised_rows(torch.outer(b, b))
        total += float((diff**2).sum())
    expected = total / (classes * width)
    for form in ("paper", "auto"):
        assert float(semantic_distance(g_t, g_s, form)) == pytest.approx(expected, rel=1e-5)


def test_semantic_distance_across_widths_compares_the_class_gram():
    torch.manual_seed(4)
    g_t, g_s = torch.randn(5, 9), torch.randn(5, 3)
    expected = _gram_distance_reference(g_t, g_s)
    assert float(semantic_distance(g_t, g_s)) == pytest.approx(expected, rel=1e-5)
    same_width = torch.randn(5, 9)
    assert float(semantic_distance(g_t, same_width, "classes")) == pytest.approx(
        _gram_distance_reference(g_t, same_width), rel=1e-5
    )
    with pytest.raises(ValueError, match="equal widths"):
        semantic_distance(g_t, g_s, "paper")


def _outputs(model: nn.Module, inputs: torch.Tensor) -> ModelOutputs:
    logits, hidden_states = model(inputs, output_hidden_states=True)
    return ModelOutputs(logits=logits.detach(), hidden=hidden_states[-1].detach())


def test_a_teacher_scored_against_itself_gets_the_maximum_score_zero():
    from kdforge.models.mlp import MLPClassifier

    torch.manual_seed(5)
    inputs, labels = torch.randn(32, 20), torch.randint(0, 4, (32,))
    teacher = _outputs(MLPClassifier(20, [16], 4), inputs)
    itself = diswot_score(teacher, teacher, labels)
    assert itself == pytest.approx({"score": 0.0, "d_rel": 0.0, "d_sem": 0.0}, abs=1e-6)
    for hidden in ([16], [8], [32, 16]):
        other = diswot_score(teacher, _outputs(gaussian_init_(MLPClassifier(20, hidden, 4)), inputs), labels)
        assert other["score"] == pytest.approx(-(other["d_rel"] + other["d_sem"]))
        assert other["score"] < itself["score"]


def test_gaussian_init_draws_unit_normal_weights_and_zero_biases():
    torch.manual_seed(6)
    layer = gaussian_init_(nn.Sequential(nn.Linear(200, 300), nn.LayerNorm(300)))
    assert float(layer[0].weight.detach().std()) == pytest.approx(1.0, abs=0.02)
    assert torch.count_nonzero(layer[0].bias) == 0
    assert torch.equal(layer[1].weight, torch.ones(300)) and torch.count_nonzero(layer[1].bias) == 0


def test_merge_section_merges_nested_sections_and_replaces_other_values():
    base = {"kind": "mlp", "hidden": [16], "from_teacher": {"layers": [0, 3], "keep": True}}
    merged = merge_section(base, {"hidden": [8, 8], "from_teacher": {"layers": [1]}})
    assert merged == {"kind": "mlp", "hidden": [8, 8], "from_teacher": {"layers": [1], "keep": True}}
    assert base["hidden"] == [16]


@pytest.fixture
def diswot_task(digits_teacher):
    recipe = load_recipe("diswot_digits", [f"teacher.model={digits_teacher}"])
    return TASKS.get(recipe.task)(recipe)


def _summary(rows):
    return [(r.candidate["hidden"], r.params, r.score, r.d_rel, r.d_sem, r.semantic) for r in rows]


def test_rank_candidates_sorts_best_first_and_repeats_for_a_seed(diswot_task, digits_teacher):
    teacher = diswot_task.load_teacher(str(digits_teacher))
    candidates = diswot_task.recipe.candidates
    batch = sample_batch(diswot_task, 64, seed=0)
    rows = rank_candidates(diswot_task, teacher, candidates, batch, seed=0)
    assert sorted(r.candidate["hidden"] for r in rows) == sorted(c["hidden"] for c in candidates)
    scores = [r.score for r in rows]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
    # the teacher fixture has one hidden layer of 64, so [64, 32] and [8] are narrower: one form for all rows
    assert {r.semantic for r in rows} == {"classes"}
    by_hidden = {tuple(r.candidate["hidden"]): r for r in rows}
    assert by_hidden[(8,)].params == 64 * 8 + 8 + 8 * 10 + 10
    assert _summary(rank_candidates(diswot_task, teacher, candidates, batch, seed=0)) == _summary(rows)
    # a candidate's score does not depend on its place in the list
    reversed_rows = rank_candidates(diswot_task, teacher, candidates[::-1], batch, seed=0)
    assert sorted(_summary(reversed_rows)) == sorted(_summary(rows))
    other_seed = rank_candidates(diswot_task, teacher, candidates, batch, seed=1)
    assert {r.score for r in other_seed} != set(scores)


def test_rank_candidates_uses_the_papers_form_when_every_width_matches_the_teacher(diswot_task, digits_teacher):
    teacher = diswot_task.load_teacher(str(digits_teacher))
    batch = sample_batch(diswot_task, 32, seed=0)
    rows = rank_candidates(
        diswot_task, teacher, [{"hidden": [64]}, {"hidden": [16, 64]}], batch, seed=0, init="default"
    )
    assert {r.semantic for r in rows} == {"paper"}


def test_a_wrong_candidate_field_names_its_index(diswot_task, digits_teacher):
    teacher = diswot_task.load_teacher(str(digits_teacher))
    batch = sample_batch(diswot_task, 8, seed=0)
    with pytest.raises(RecipeError, match=r"^candidates\[1\]\.hiden: unknown field"):
        rank_candidates(diswot_task, teacher, [{"hidden": [8]}, {"hiden": [8]}], batch, seed=0)


class _LogitsOnlyTask(ClassificationTask):
    """A task whose adapter gives logits only, as one without feature outputs would."""

    def adapter(self, model, batch, fields):
        return ModelOutputs(logits=model(batch["inputs"]))


def test_a_task_without_hidden_features_is_a_recipe_error_naming_the_field(diswot_task, digits_teacher):
    task = _LogitsOnlyTask(diswot_task.recipe)
    teacher = task.load_teacher(str(digits_teacher))
    with pytest.raises(RecipeError, match="no 'hidden' output"):
        rank_candidates(task, teacher, [{"hidden": [8]}], sample_batch(task, 8, seed=0), seed=0)


def test_students_rank_prints_every_candidate_of_the_bundled_recipe(digits_teacher):
    result = CliRunner().invoke(
        app, ["students", "rank", "diswot_digits", "--set", f"teacher.model={digits_teacher}"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    for hidden in ("[8]", "[16]", "[32]", "[64]", "[16, 16]", "[64, 32]"):
        assert f"hidden: {hidden} " in result.stdout
    assert "DisWOT ranking" in result.stdout
    ranks = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("│")]
    assert ranks == ["1", "2", "3", "4", "5", "6"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["digits_kd", "--set", "teacher.model=runs/none/model"], "candidates: the recipe lists no candidate"),
        (["digits_teacher", "--set", "candidates=[{hidden: [8]}]"], "teacher.model: ranking students compares"),
        (["diswot_digits", "--set", "teacher.model=x", "--batch-size", "5000"], "--batch-size 5000"),
        (["diswot_digits", "--init", "uniform"], "--init uniform"),
    ],
)
def test_students_rank_user_errors_are_one_line_and_exit_2(args, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as info:
        main(["students", "rank", *args])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_candidates_round_trip_through_a_saved_recipe_and_are_left_out_when_absent():
    import yaml

    from kdforge.checks import parse_recipe

    recipe = load_recipe("diswot_digits")
    assert parse_recipe(yaml.safe_load(recipe.to_yaml())).candidates == recipe.candidates
    assert "candidates" not in load_recipe("digits_kd").to_yaml()
