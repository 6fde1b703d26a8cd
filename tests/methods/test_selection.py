"""Data selection (active distillation) and data pruning: budgets, no point queried twice, whole runs."""

import numpy as np
import pytest
import torch

from conftest import tiny
from kdforge.checks import load_recipe
from kdforge.cli import main
from kdforge.data.indexed import INDEX_KEY
from kdforge.errors import RecipeError
from kdforge.methods.active_distillation import query_teacher, run_selection_rounds
from kdforge.methods.active_distillation.strategies import (
    Selection,
    choose,
    rad_probabilities,
    systematic_sample,
    teacher_error_rate,
)
from kdforge.methods.data_pruning import Pruning, keep_indices, margins
from kdforge.models.mlp import MLPClassifier
from kdforge.outputs import ModelOutputs
from kdforge.runner import run_recipe
from kdforge.signals.base import TeacherSignal
from kdforge.tasks import TASKS


class SpyTeacher(TeacherSignal):
    """A teacher that records every example it is asked about."""

    def __init__(self, model):
        self.model = model
        self.asked: list[int] = []

    def outputs(self, batch, fields):
        self.asked += batch[INDEX_KEY].tolist()
        with torch.no_grad():
            return ModelOutputs(logits=self.model(batch["inputs"]))


# ---- the pieces -------------------------------------------------------------------------------
def test_rounds_spend_exactly_the_budget():
    assert Selection(strategy="rad", budget=100, rounds=4).per_round() == [25, 25, 25, 25]
    assert Selection(strategy="margin", budget=10, rounds=3, initial=4).per_round() == [4, 3, 3]
    assert sum(Selection(strategy="random", budget=7, rounds=3).per_round()) == 7
    with pytest.raises(ValueError, match="initial"):
        Selection(strategy="rad", budget=5, initial=6)


@pytest.mark.parametrize("strategy", ["random", "margin", "rad"])
def test_each_strategy_picks_the_count_among_the_candidates_without_repeats(strategy):
    rng = np.random.default_rng(0)
    candidates = np.sort(rng.choice(1000, size=300, replace=False))
    logits = torch.randn(300, 5)
    picked = choose(strategy, candidates, 40, rng, student_logits=logits, teacher_error=0.1)
    assert len(picked) == len(set(picked.tolist())) == 40
    assert np.isin(picked, candidates).all()


def test_margin_picks_the_smallest_student_margins():
    logits = torch.tensor([[5.0, 0.0], [0.1, 0.0], [2.0, 0.0], [0.0, 0.05]])
    picked = choose("margin", np.array([10, 11, 12, 13]), 2, np.random.default_rng(0), student_logits=logits)
    assert picked.tolist() == [11, 13]


def test_rad_probabilities_sum_to_the_budget_and_equalise_expected_gain():
    gains = np.random.default_rng(1).uniform(0.05, 1, 500)
    supports = []
    for mistakes in (0.0, 2.0, 5.0, 10.0):
        p = rad_probabilities(gains, 20, mistakes)
        assert p.sum() == pytest.approx(20) and (p >= 0).all() and (p <= 1 + 1e-9).all()
        on = p > 0
        # the learner's best answer to the adversary: p * g equal over the chosen set
        assert np.ptp(p[on] * gains[on]) < 1e-9
        # the set is the highest gains
        assert gains[on].min() >= gains[~on].max()
        supports.append(on.sum())
    # the more mistakes the teacher is expected to make, the more the queries hedge across points
    assert supports == sorted(supports) and supports[-1] > supports[0]


def test_systematic_sampling_includes_each_point_with_its_probability():
    p = np.array([0.9, 0.5, 0.3, 0.2, 0.1, 0.0])
    rng = np.random.default_rng(0)
    counts = np.zeros(len(p))
    for _ in range(4000):
        drawn = systematic_sample(p, rng)
        assert len(drawn) == 2 and len(set(drawn.tolist())) == 2
        counts[drawn] += 1
    assert np.allclose(counts / 4000, p, atol=0.03)


def test_teacher_error_rate_is_one_minus_confidence():
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.6, 0.4]]))
    assert teacher_error_rate(logits) == pytest.approx((0.1 + 0.4) / 2)


def test_pruning_keeps_the_fraction_random_or_by_margin():
    assert len(keep_indices(1000, Pruning(fraction=0.2))) == 200
    assert (
        keep_indices(1000, Pruning(fraction=0.2, seed=3)).tolist()
        == keep_indices(1000, Pruning(fraction=0.2, seed=3)).tolist()
    )
    logits = torch.tensor([[3.0, 0.0], [0.1, 0.0], [1.0, 0.0], [0.0, 0.2]])
    scores = margins(logits)
    assert keep_indices(4, Pruning(fraction=0.5, by="teacher_margin"), scores).tolist() == [1, 3]
    assert keep_indices(4, Pruning(fraction=0.5, by="teacher_margin", keep="easy"), scores).tolist() == [0, 2]


# ---- the rounds, with a spy teacher ----------------------------------------------------------
@pytest.mark.parametrize("strategy", ["random", "margin", "rad"])
def test_rounds_query_each_point_once_and_stop_at_the_budget(strategy, tmp_path):
    recipe = tiny("digits_kd", tmp_path, "data.train_limit=null")
    task = TASKS.get(recipe.task)(recipe)
    pool = task.splits().train
    torch.manual_seed(0)
    spy = SpyTeacher(MLPClassifier(64, [16], 10).eval())
    seen_sizes = []

    def train_round(r, model, dataset, teacher):
        seen_sizes.append(len(dataset))
        model = model or MLPClassifier(64, [8], 10)
        optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
        batch = task.collate([dataset[i] for i in range(len(dataset))])
        batch[INDEX_KEY] = torch.arange(len(dataset))
        target = teacher.outputs(batch, frozenset({"logits"})).logits.softmax(-1)
        loss = torch.nn.functional.cross_entropy(model(batch["inputs"]), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        return model

    cfg = Selection(strategy=strategy, budget=90, rounds=3, initial=30)
    _, log = run_selection_rounds(task, cfg, pool, spy, train_round, lambda m: {"accuracy": 0.0}, 16)
    assert len(spy.asked) == len(set(spy.asked)) == log.queries == 90  # never the same point twice
    assert seen_sizes == [30, 60, 90] and [r["queried"] for r in log.rounds] == [30, 30, 30]


def test_queried_outputs_come_from_the_pool_positions(tmp_path):
    recipe = tiny("digits_kd", tmp_path)
    task = TASKS.get(recipe.task)(recipe)
    pool = task.splits().train
    spy = SpyTeacher(MLPClassifier(64, [16], 10).eval())
    positions = np.array([7, 3, 42])
    logits = query_teacher(task, spy, pool, positions, batch_size=2)
    assert spy.asked == [7, 3, 42]
    expected = spy.model(torch.stack([pool[i]["inputs"] for i in positions]))
    assert torch.allclose(logits, expected)


# ---- whole runs at tiny size -------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["random", "margin", "rad"])
def test_selection_run_reports_its_queries_and_a_fair_baseline(strategy, tmp_path, digits_teacher, unchanged):
    recipe = tiny(
        "digits_kd",
        tmp_path,
        f"teacher.model={digits_teacher}",
        "data.train_limit=null",
        f"methods=[{{name: active_distillation, strategy: {strategy}, budget: 60, rounds: 3}}]",
        "training.steps=3",
    )
    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    student = report["runs"][0]["models"]["student"]["train"]
    baseline = report["runs"][0]["models"]["baseline"]["train"]
    assert student["selection"]["teacher_queries"] == 60
    assert [r["total"] for r in student["selection"]["rounds"]] == [20, 40, 60]
    assert student["steps"] == 9 and baseline["steps"] == 9
    assert "Active distillation" in (recipe.run_dir / "report.html").read_text()


def test_pruned_run_trains_student_and_baseline_on_the_kept_share(tmp_path, digits_teacher, unchanged):
    recipe = tiny(
        "digits_kd",
        tmp_path,
        f"teacher.model={digits_teacher}",
        "data.train_limit=null",
        "methods=[{name: data_pruning, fraction: 0.1, by: teacher_margin}]",
        "training.steps=null",
        "training.epochs=1",
        "training.batch_size=10",
    )
    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    assert report["data_plan"]["prune"]["kept"] == round(1347 * 0.1)
    for role in ("student", "baseline"):
        assert report["runs"][0]["models"][role]["train"]["steps"] == 14  # one epoch of 135 examples, batches of 10


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["methods=[{name: active_distillation, strategy: rad, budget: 10}, {name: data_pruning, fraction: 0.5}]"],
            "cannot be combined",
        ),
        (["methods=[{name: active_distillation, strategy: best, budget: 10}]"], "methods[0].strategy"),
        (["methods=[{name: data_pruning, fraction: 1.5}]"], "methods[0].fraction"),
        (["methods=[{name: active_distillation, strategy: rad, budget: 0}]"], "methods[0].budget"),
    ],
)
def test_bad_plans_are_one_line_errors(overrides, message, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["validate", "digits_kd", *sum((["--set", o] for o in overrides), [])])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_selection_needs_a_teacher_and_logit_terms(tmp_path, digits_teacher):
    """Both are found when the recipe is checked, before anything runs."""
    with pytest.raises(RecipeError, match="'active_distillation' needs a teacher"):
        tiny("digits_teacher", tmp_path, "methods=[{name: active_distillation, strategy: rad, budget: 10}]")
    with pytest.raises(RecipeError, match=r"methods\[0\]: active distillation buys the teacher's logits"):
        tiny(
            "digits_kd",
            tmp_path,
            f"teacher.model={digits_teacher}",
            "methods=[{name: active_distillation, strategy: rad, budget: 10}]",
            "objective=[{loss: hidden_mse, field: hidden}]",
            "student.hidden=[64]",
        )


@pytest.mark.parametrize(("old", "method"), [("selection", "active_distillation"), ("prune", "data_pruning")])
def test_a_method_left_in_the_data_section_is_refused_with_its_new_spelling(old, method):
    with pytest.raises(
        RecipeError, match=rf"data.{old} moved to the recipe's methods list; write methods: \[{{name: {method}"
    ):
        load_recipe("digits_kd", [f"data.{old}={{budget: 10}}"])


def test_a_bundled_recipe_validates_with_a_plan():
    recipe = load_recipe(
        "digits_kd", ["methods=[{name: active_distillation, strategy: margin, budget: 100, rounds: 2}]"]
    )
    assert recipe.methods == [{"name": "active_distillation", "strategy": "margin", "budget": 100, "rounds": 2}]


@pytest.mark.parametrize(("fraction", "alpha"), [(1.0, 0.5), (0.5, 1.0), (0.1, 0.25)])
def test_a_pruning_sweep_cell_runs_at_tiny_size(fraction, alpha, tmp_path, digits_teacher, unchanged):
    """One cell of the data-pruning sweep: (1 - alpha) CE + alpha KD on a kept fraction f, as the benchmark sets it."""
    recipe = tiny(
        "digits_kd",
        tmp_path,
        f"teacher.model={digits_teacher}",
        "data.train_limit=null",
        f"methods=[{{name: data_pruning, fraction: {fraction}, by: random, seed: 0}}]",
        f"objective[0].weight={1 - alpha}",
        f"objective[1].weight={alpha}",
        "evaluation.baseline=false",
    )
    assert [t.weight for t in recipe.objective] == [1 - alpha, alpha]
    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    assert report["data_plan"]["prune"]["kept"] == round(1347 * fraction)
    assert report["runs"][0]["models"]["student"]["train"]["steps"] == 12


def test_the_selection_seed_follows_the_training_seed_unless_set(tmp_path):
    from kdforge.methods.active_distillation import selection_seed
    from kdforge.methods.base import settings_of

    recipe = tiny(
        "digits_kd", tmp_path, "methods=[{name: active_distillation, strategy: random, budget: 10}]", "training.seed=7"
    )
    task = TASKS.get(recipe.task)(recipe)
    assert selection_seed(task, settings_of(recipe.methods[0], "methods[0]")[1]) == 7
    fixed = tiny(
        "digits_kd",
        tmp_path,
        "methods=[{name: active_distillation, strategy: random, budget: 10, seed: 3}]",
        "training.seed=7",
    )
    task = TASKS.get(fixed.task)(fixed)
    assert selection_seed(task, settings_of(fixed.methods[0], "methods[0]")[1]) == 3


def test_only_the_first_round_warms_up_and_for_at_most_a_tenth_of_its_steps():
    from kdforge.runner import _round_training

    recipe = load_recipe(
        "digits_kd", ["training.schedule.warmup_steps=50", "training.epochs=1", "training.batch_size=10"]
    )
    assert _round_training(recipe, 0, 200).schedule.warmup_steps == 2  # 20 steps in the round
    assert _round_training(recipe, 0, 10_000).schedule.warmup_steps == 50
    assert _round_training(recipe, 1, 200).schedule.warmup_steps == 0
    assert recipe.training.schedule.warmup_steps == 50  # the recipe itself is untouched
