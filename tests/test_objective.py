import pytest
import torch

from kdforge.objective import Objective, schedule_factor
from kdforge.outputs import ModelOutputs
from kdforge.recipe import ObjectiveTerm, TermSchedule


def test_weighted_sum_and_each_term_reported():
    terms = [
        ObjectiveTerm(loss="cross_entropy", weight=0.25),
        ObjectiveTerm(loss="hinton_kd", weight=0.75, params={"temperature": 2.0}),
    ]
    objective = Objective(terms, total_steps=10)
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    labels = torch.randint(0, 4, (6,), generator=g)
    loss, values = objective(ModelOutputs(logits=s), ModelOutputs(logits=t), {"labels": labels}, step=0)
    assert set(values) == {"cross_entropy", "hinton_kd"}
    assert loss.item() == pytest.approx(
        0.25 * values["cross_entropy"].item() + 0.75 * values["hinton_kd"].item(), rel=1e-6
    )
    assert objective.teacher_fields == {"logits"} and objective.needs_teacher


def test_labels_only_objective_needs_no_teacher():
    objective = Objective([ObjectiveTerm(loss="cross_entropy")], total_steps=1)
    assert not objective.needs_teacher


@pytest.mark.parametrize(
    "shape, step, expected",
    [
        ("linear", 0, 0.0),
        ("linear", 50, 0.5),
        ("linear", 500, 1.0),
        ("quadratic", 50, 0.25),
        ("cosine", 50, 0.5),
        ("constant", 70, 0.0),
    ],
)
def test_term_schedules(shape, step, expected):
    sched = TermSchedule(shape=shape, start=0.0, end=1.0, steps=100)
    assert schedule_factor(sched, step, total_steps=1000) == pytest.approx(expected)


def test_schedule_defaults_to_the_whole_run():
    assert schedule_factor(TermSchedule(start=1.0, end=0.0), 25, total_steps=100) == pytest.approx(0.75)


def test_a_bad_loss_parameter_names_the_term():
    objective = Objective([ObjectiveTerm(loss="hinton_kd", params={"temperature": -1.0})], total_steps=1)
    x = torch.zeros(2, 3)
    from kdforge.errors import RecipeError

    with pytest.raises(RecipeError, match=r"objective\[0\] \(hinton_kd\): temperature must be > 0"):
        objective(ModelOutputs(logits=x), ModelOutputs(logits=x), {}, step=0)


def test_a_regulariser_term_runs_without_a_teacher():
    objective = Objective([ObjectiveTerm(loss="flops", field="logits", weight=0.5)], total_steps=1)
    assert not objective.needs_teacher
    w = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
    loss, values = objective(ModelOutputs(logits=w), None, {}, step=0)
    # (mean_b |w|)^2 summed over the vocabulary: 2^2 + 0 + 1^2
    assert loss.item() == pytest.approx(0.5 * 5.0)


def test_code_only_parameters_are_not_recipe_parameters():
    from kdforge.losses import LOSSES

    assert "projection" not in LOSSES.get("hidden_mse").param_names()
