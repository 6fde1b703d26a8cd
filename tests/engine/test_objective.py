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


MI_TERM = ObjectiveTerm(loss="mi_alpha", field="hidden", params={"student_dim": 3, "teacher_dim": 5, "critic": "mlp"})


def _features(seed=0, batch=6, student_dim=3, teacher_dim=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, student_dim, generator=g), torch.randn(batch, teacher_dim, generator=g)


def test_a_loss_module_term_is_built_once_and_owned_by_the_objective():
    from kdforge.losses.mutual_information import MIAlpha

    objective = Objective([ObjectiveTerm(loss="cross_entropy"), MI_TERM], total_steps=10)
    modules = objective.loss_modules()
    assert list(modules) == ["objective[1]"]
    assert isinstance(modules["objective[1]"], MIAlpha) and modules["objective[1]"].teacher_dim == 5
    assert objective.parameters() == list(modules.parameters()) and objective.parameters()
    assert objective.teacher_fields == {"hidden"} and objective.student_fields == {"logits", "hidden"}

    s, t = _features()
    labels = torch.tensor([0, 1, 0, 1, 0, 1])
    student = ModelOutputs(logits=torch.randn(6, 2), hidden=s)
    loss, values = objective(student, ModelOutputs(hidden=t), {"labels": labels}, step=0)
    assert values["mi_alpha"].item() == pytest.approx(modules["objective[1]"](s, t).item())
    loss.backward()
    assert all(p.grad is not None for p in objective.parameters())
    # the same module on every call: moving it (as the engine does) is what the objective uses
    assert objective.loss_modules()["objective[1]"] is modules["objective[1]"]


def test_an_objective_without_loss_modules_has_no_parameters():
    objective = Objective([ObjectiveTerm(loss="cross_entropy"), ObjectiveTerm(loss="hinton_kd")], total_steps=1)
    assert objective.parameters() == [] and len(objective.loss_modules()) == 0


def test_loss_modules_start_from_the_seed_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    a = Objective([MI_TERM], total_steps=1, seed=7)
    after = torch.rand(3)
    torch.manual_seed(999)
    b = Objective([MI_TERM], total_steps=1, seed=7)
    c = Objective([MI_TERM], total_steps=1, seed=8)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after)


def test_module_call_parameters_are_passed_on_every_call():
    from kdforge.losses.dac_kl import DACKL

    term = ObjectiveTerm(loss="dac_kl", params={"temperature": 2.0, "top_m": 4})
    objective = Objective([term], total_steps=1)
    module = objective.loss_modules()["objective[0]"]
    assert module.top_m == 4
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    _, values = objective(ModelOutputs(logits=s), ModelOutputs(logits=t), {}, step=0)
    assert values["dac_kl"].item() == pytest.approx(module(s, t, temperature=2.0).item())
    assert values["dac_kl"].item() != pytest.approx(DACKL(top_m=4)(s, t).item())


def test_a_feature_size_that_differs_from_the_term_names_the_parameter():
    from kdforge.errors import RecipeError

    objective = Objective([ObjectiveTerm(loss="cross_entropy"), MI_TERM], total_steps=1)
    s, t = _features(student_dim=4)
    out = ModelOutputs(logits=torch.randn(6, 2), hidden=s)
    with pytest.raises(RecipeError) as info:
        objective(out, ModelOutputs(hidden=t), {"labels": torch.zeros(6, dtype=torch.long)}, step=0)
    assert str(info.value) == (
        "objective[1].params.student_dim: 'mi_alpha' was built for student_dim=3,"
        " but the student's 'hidden' has size 4; set student_dim: 4"
    )
    s, t = _features(teacher_dim=8)
    with pytest.raises(RecipeError, match=r"^objective\[0\].params.teacher_dim: .* teacher's 'hidden' has size 8;"):
        Objective([MI_TERM], total_steps=1)(ModelOutputs(hidden=s), ModelOutputs(hidden=t), {}, step=0)


def test_a_loss_module_term_on_a_tuple_field_names_the_field():
    from kdforge.errors import RecipeError

    term = MI_TERM.model_copy(update={"field": "hidden_states"})
    s, t = _features()
    with pytest.raises(RecipeError, match=r"^objective\[0\].field: 'mi_alpha' compares one tensor, .* is a tuple"):
        Objective([term], total_steps=1)(ModelOutputs(hidden_states=(s,)), ModelOutputs(hidden_states=(t,)), {}, 0)


def test_bad_module_values_are_refused_when_the_objective_is_built():
    from kdforge.errors import RecipeError

    term = ObjectiveTerm(loss="mi_alpha", params={"student_dim": 3, "teacher_dim": 5, "critic": "concat"})
    with pytest.raises(RecipeError, match=r"^objective\[0\].params: critic must be 'bilinear' or 'mlp'"):
        Objective([term], total_steps=1)


def test_a_loss_module_that_needs_full_logits_refuses_a_top_k_teacher_with_the_fix():
    """dac_kl with a cached (top-k) teacher: the message names the cause, not a 'tuple' field."""
    from kdforge.errors import RecipeError

    objective = Objective([ObjectiveTerm(loss="dac_kl")], total_steps=1)
    s = torch.randn(2, 3, 7)
    topk = (torch.tensor([[[0, 1]] * 3] * 2), torch.log(torch.full((2, 3, 2), 0.4)))
    with pytest.raises(RecipeError, match=r"objective\[0\]\.loss: 'dac_kl' needs the teacher's full logits.*online"):
        objective(ModelOutputs(logits=s), ModelOutputs(logits=topk), {}, step=0)
