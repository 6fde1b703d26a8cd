"""Every registered method: its paper and needs as data, and a recipe whose task cannot serve it refused in one line."""

import pytest

from kdforge import cli
from kdforge.checks import load_recipe
from kdforge.errors import RecipeError
from kdforge.methods import METHODS
from kdforge.methods.base import CAPABILITIES, Method
from kdforge.recipe import find_recipe, read_raw
from kdforge.tasks import TASKS

#: name -> (arXiv id, year, what it requires of the task, whether it needs a teacher)
EXPECTED = {
    "active_distillation": ("2210.01213", 2023, {"gives_logits"}, True),
    "data_pruning": ("2403.07854", 2024, {"gives_logits"}, False),
    "ground_truth_mixing": ("2102.13088", 2021, {"has_labels", "gives_logits"}, True),
    "on_policy": ("2306.13649", 2024, {"writes_text"}, True),
    "online_generation": ("2502.02671", 2025, {"writes_text"}, False),
    "pgkd": ("2411.05045", 2024, {"labelled_texts"}, False),
    "step_by_step": ("2305.02301", 2023, {"writes_text"}, False),
    "tasb_batches": ("2104.06967", 2021, {"has_pairs"}, False),
    "teacher_generated": ("1606.07947", 2016, {"writes_text"}, False),
    "teacher_hacking_monitor": ("2502.02671", 2025, {"writes_text"}, True),
}

#: a recipe entry of each method, and a bundled recipe whose task lacks what it needs
ENTRIES = {
    "active_distillation": ("{name: active_distillation, strategy: rad, budget: 10}", "smollm2_kd"),
    "data_pruning": ("{name: data_pruning, fraction: 0.5}", "smollm2_kd"),
    "ground_truth_mixing": ("{name: ground_truth_mixing, temperature: 8}", "smollm2_kd"),
    "on_policy": ("{name: on_policy}", "digits_kd"),
    "online_generation": ("{name: online_generation}", "digits_kd"),
    "pgkd": ("{name: pgkd}", "digits_kd"),
    "step_by_step": ("{name: step_by_step}", "digits_kd"),
    "tasb_batches": ("{name: tasb_batches}", "digits_kd"),
    "teacher_generated": ("{name: teacher_generated}", "digits_kd"),
    "teacher_hacking_monitor": ("{name: teacher_hacking_monitor, golden_data: held_out.jsonl}", "digits_kd"),
}


def test_every_method_is_listed_here():
    assert set(METHODS) == set(EXPECTED) == set(ENTRIES)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_method_carries_its_paper_summary_settings_and_needs(name):
    cls = METHODS.get(name)
    arxiv, year, requires, teacher = EXPECTED[name]
    assert issubclass(cls, Method) and cls.name == name and cls.summary
    assert (cls.paper.arxiv, cls.paper.year) == (arxiv, year) and cls.paper.title
    assert cls.requires == requires and cls.needs_teacher is teacher
    assert cls.requires <= set(CAPABILITIES), "every capability has the words its error message uses"


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_a_task_that_cannot_serve_it_is_refused_at_validate_in_one_line(name, capsys):
    entry, recipe = ENTRIES[name]
    with pytest.raises(SystemExit) as stop:
        cli.main(["validate", recipe, "--set", f"methods=[{entry}]"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    task = read_raw(find_recipe(recipe))["task"]
    lacking = sorted(METHODS.get(name).requires - TASKS.get(task).capabilities)
    assert len(err.splitlines()) == 1 and err.startswith("error: methods[0].name: method ")
    assert f"'{name}'" in err and f"task {task!r} does not ({lacking[0]})" in err


def test_an_unknown_method_names_the_known_ones():
    with pytest.raises(RecipeError, match=r"methods\[0\].name: unknown method 'tasb'; known: active_distillation"):
        load_recipe("digits_kd", ["methods=[{name: tasb}]"])


def test_a_method_listed_twice_or_without_a_name_is_refused():
    with pytest.raises(RecipeError, match="'data_pruning' is listed twice"):
        load_recipe("digits_kd", ["methods=[{name: data_pruning, fraction: 0.5}, {name: data_pruning, fraction: 0.2}]"])
    with pytest.raises(RecipeError, match=r"methods\[0\]: give the method's name"):
        load_recipe("digits_kd", ["methods=[{fraction: 0.5}]"])


def test_two_methods_that_train_the_student_in_rounds_are_refused():
    entries = "{name: active_distillation, strategy: rad, budget: 10}, {name: pgkd}"
    with pytest.raises(RecipeError, match="active_distillation and pgkd each train the student in their own rounds"):
        load_recipe("text_kd_sst2", [f"methods=[{entries}]"])
