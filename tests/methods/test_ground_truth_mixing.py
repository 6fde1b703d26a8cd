"""Ground-truth mixing (Borup and Andersen 2021): the target is (1 - gamma) p_teacher + gamma onehot(y)."""

import pytest
import torch

from conftest import tiny
from kdforge.checks import load_recipe
from kdforge.errors import RecipeError
from kdforge.losses import cross_entropy
from kdforge.methods.ground_truth_mixing import GroundTruthMixing, GroundTruthMixingSettings, mixed_target_logits
from kdforge.runner import run_recipe

torch.manual_seed(0)
LOGITS = torch.randn(6, 5) * 3
LABELS = torch.tensor([0, 4, 2, 2, 1, 3])


@pytest.mark.parametrize("temperature", [1.0, 2.0, 8.0])
@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_the_mixed_logits_give_exactly_the_mixed_distribution_at_the_temperature(gamma, temperature):
    mixed = mixed_target_logits(LOGITS, LABELS, gamma=gamma, temperature=temperature)
    expected = (1 - gamma) * torch.softmax(LOGITS / temperature, -1) + gamma * torch.eye(5)[LABELS]
    assert torch.allclose(torch.softmax(mixed / temperature, -1), expected, atol=1e-6)
    assert torch.isfinite(mixed).all()  # gamma 1 leaves zero probabilities, kept finite


def test_soft_cross_entropy_on_the_mixed_target_is_the_mix_of_the_two_losses():
    """-sum p_mix log q = (1 - gamma) CE(p_teacher, q) + gamma CE(y, q): the label enters as its own CE term."""
    student = torch.randn(6, 5)
    gamma = 0.25
    log_q = torch.log_softmax(student, -1)
    target = torch.softmax(mixed_target_logits(LOGITS, LABELS, gamma=gamma), -1)
    soft_ce = -(target * log_q).sum(-1).mean()
    teacher_ce = -(torch.softmax(LOGITS, -1) * log_q).sum(-1).mean()
    assert torch.allclose(soft_ce, (1 - gamma) * teacher_ce + gamma * cross_entropy(student, LABELS), atol=1e-6)


def test_a_schedule_moves_gamma_from_start_to_end():
    recipe = load_recipe("digits_kd", ["training.epochs=null", "training.steps=100"])
    cfg = GroundTruthMixingSettings(schedule={"shape": "linear", "start": 0.5, "end": 0.1})
    method = GroundTruthMixing(cfg, type("T", (), {"recipe": recipe})())
    assert [round(method.gamma_at(s), 6) for s in (0, 50, 100, 200)] == [0.5, 0.3, 0.1, 0.1]
    assert GroundTruthMixing(GroundTruthMixingSettings(gamma=0.2), None).gamma_at(77) == 0.2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["methods=[{name: ground_truth_mixing}]"], r"objective\[1\].params.temperature: 8, but methods\[0\]"),
        (["methods=[{name: ground_truth_mixing, gamma: 1.5, temperature: 8}]"], r"methods\[0\].gamma: must be <= 1"),
        (
            ["methods=[{name: ground_truth_mixing, temperature: 8, schedule: {start: 0.5, end: 0.1}}]"],
            r"methods\[0\].schedule.steps: give the schedule's length",
        ),
        (
            [
                "methods=[{name: ground_truth_mixing, temperature: 8}]",
                "teacher=null",
                "objective=[{loss: cross_entropy}]",
            ],
            r"'ground_truth_mixing' needs a teacher",
        ),
    ],
)
def test_mistakes_are_refused_when_the_recipe_is_checked(overrides, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe("digits_kd", overrides)


def _run(tmp_path, teacher, name, *methods):
    extra = [f"methods=[{', '.join(methods)}]"] if methods else []
    recipe = tiny("digits_kd", tmp_path, f"teacher.model={teacher}", f"output.name={name}", "evaluation.baseline=false",
                  *extra)  # fmt: skip
    return recipe, run_recipe(recipe)


def test_a_run_learns_the_mixed_target_and_reports_it(tmp_path, digits_teacher):
    plain_recipe, plain = _run(tmp_path, digits_teacher, "plain")
    recipe, mixed = _run(tmp_path, digits_teacher, "mixed", "{name: ground_truth_mixing, gamma: 0.5, temperature: 8}")
    _, neutral = _run(tmp_path, digits_teacher, "neutral", "{name: ground_truth_mixing, gamma: 0.0, temperature: 8}")
    losses = {n: r["runs"][0]["models"]["student"]["train"]["final_terms"]["hinton_kd"] for n, r in
              (("plain", plain), ("mixed", mixed), ("neutral", neutral))}  # fmt: skip
    # gamma 0 is the teacher's own target (up to rounding); gamma 0.5 is another target, so another loss
    assert losses["neutral"] == pytest.approx(losses["plain"], rel=1e-4)
    assert abs(losses["mixed"] - losses["plain"]) > 1e-3
    train = mixed["runs"][0]["models"]["student"]["train"]
    assert train["ground_truth_mixing"] == {"gamma_first": 0.5, "gamma_last": 0.5}
    assert "Ground-truth mixing" in (recipe.run_dir / "report.html").read_text()
    assert "Ground-truth mixing" not in (plain_recipe.run_dir / "report.html").read_text()
