import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import Field, ValidationError

from kdforge.checks import load_recipe, parse_recipe
from kdforge.errors import KDForgeError, RecipeError
from kdforge.recipe import Recipe, Strict, apply_override, find_recipe, read_raw, validation_error


def raw(name="digits_kd"):
    return read_raw(load_recipe.__globals__["find_recipe"](name))


def test_bundled_recipes_validate(recipes):
    assert {"digits_teacher", "digits_kd"} <= set(recipes)
    for name in recipes:
        assert isinstance(load_recipe(name), Recipe)


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective[1].weight=-1", "objective[1].weight: must be >= 0"),
        ("training.lr=0", "training.lr: must be > 0"),
        ("training.batch_sise=3", "training.batch_sise: unknown field"),
        ("objective[0].loss=nope", "objective[0].loss: unknown loss 'nope'"),
        ("objective[1].params.tempreture=2", "objective[1].params.tempreture: 'hinton_kd' has no parameter"),
        ("objective[1].field=embeddings", "objective[1].field: task 'classification' has no output 'embeddings'"),
        ("task=translation", "task: unknown task 'translation'"),
        ("student.hidden=wide", "student.hidden:"),
        ("data.test_fraction=1.5", "data.test_fraction: must be < 1"),
        ("training.precision=fp8", "training.precision: must be one of"),
        ("training.epochs=null", "give exactly one of training.steps or training.epochs"),
        ("teacher=null", "objective[1].loss: 'hinton_kd' compares with the teacher"),
    ],
)
def test_errors_name_the_field(override, message):
    with pytest.raises(RecipeError) as info:
        load_recipe("digits_kd", [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_every_mistake_is_named_on_a_line_of_its_own():
    with pytest.raises(RecipeError) as info:
        load_recipe("digits_kd", ["training.lr=0", "training.batch_size=0", "evaluation.batch_sise=8"])
    lines = str(info.value).splitlines()
    assert lines == [
        "training.lr: must be > 0, got 0",
        "training.batch_size: must be >= 1, got 0",
        "evaluation.batch_sise: unknown field (check the spelling; `kdforge fields TASK` lists the fields)",
    ]
    assert "more)" not in str(info.value)


def test_every_mistake_in_a_task_section_is_named_with_its_section():
    with pytest.raises(RecipeError) as info:
        load_recipe("digits_kd", ["data.test_fraction=1.5", "student.hiden=[8]"])
    assert str(info.value).splitlines() == [
        "student.hiden: unknown field (check the spelling; `kdforge fields TASK` lists the fields)",
        "data.test_fraction: must be < 1, got 1.5",
    ]


class Files(Strict):
    files: str | list[str] | dict[str, str | list[str]] | None = None
    columns: dict[str, str] = {}
    max_length: int = Field(64, ge=8)


@pytest.mark.parametrize(
    "files, line",
    [
        (5, "data.files: must be a string, a list or a mapping, got 5"),
        ([1, "a"], "data.files[0]: input should be a valid string, got 1"),
        ({"train": 3}, "data.files.train: must be a string or a list, got 3"),
    ],
)
def test_a_wrong_value_of_a_union_field_is_one_mistake(files, line):
    """pydantic reports one error per member of the union tried; the user made one mistake."""
    with pytest.raises(ValidationError) as info:
        Files.model_validate({"files": files, "columns": {"Text": 5}, "max_length": 2})
    assert str(validation_error(info.value, ("data",))).splitlines() == [
        line,
        "data.columns.Text: input should be a valid string, got 5",  # a mapping's key, not a union's member
        "data.max_length: must be >= 8, got 2",
    ]


@pytest.mark.parametrize(
    "given, dropped, kept",
    [("training.steps=40", "epochs", ("steps", 40)), ("training.epochs=2", "steps", ("epochs", 2))],
)
def test_setting_steps_or_epochs_drops_the_other(given, dropped, kept):
    recipe = load_recipe("digits_kd", ["training.epochs=null", "training.steps=7", given])
    assert getattr(recipe.training, dropped) is None
    assert getattr(recipe.training, kept[0]) == kept[1]


def test_setting_steps_on_a_recipe_written_with_epochs_runs_that_many_steps():
    assert raw()["training"]["epochs"] == 100  # the bundled recipe gives its length in epochs
    recipe = load_recipe("digits_kd", ["training.steps=40"])
    assert recipe.training.steps == 40 and recipe.training.epochs is None


def test_setting_one_length_to_null_keeps_the_other():
    data = raw()
    apply_override(data, "training.steps=null")
    assert data["training"]["epochs"] == 100 and data["training"]["steps"] is None


def test_set_overrides_values_of_any_type():
    recipe = load_recipe(
        "digits_kd", ["training.lr=3e-4", "student.hidden=[8, 8]", "objective[1].params.temperature=2"]
    )
    assert recipe.training.lr == 3e-4
    assert recipe.student["hidden"] == [8, 8]
    assert recipe.objective[1].params == {"temperature": 2}


@pytest.mark.parametrize("bad", ["training.lr", "objective[9].weight=1", "a..b=1", "training.lr.x=1"])
def test_bad_overrides_are_recipe_errors(bad):
    with pytest.raises(RecipeError):
        load_recipe("digits_kd", [bad])


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\ntask: [classification\n")
    with pytest.raises(RecipeError, match="not valid YAML at line"):
        load_recipe(path)


def test_missing_recipe_file_lists_bundled_ones():
    with pytest.raises(RecipeError, match="digits_kd"):
        load_recipe("no/such/file.yaml")


def test_run_dir_and_term_names():
    recipe = load_recipe(
        "digits_kd", ["output.dir=/tmp/x", "objective[1].loss=cross_entropy", "objective[1].params={}"]
    )
    assert str(recipe.run_dir) == "/tmp/x/digits-kd"
    assert recipe.term_names() == ["cross_entropy", "cross_entropy_2"]


yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(
    doc=st.dictionaries(
        st.sampled_from(["name", "task", "student", "data", "objective", "training", "teacher", "x"]), yaml_values
    )
)
def test_any_mapping_gives_a_recipe_or_a_kdforge_error(doc):
    try:
        parse_recipe(doc)
    except KDForgeError:
        pass


@settings(max_examples=60, deadline=None)
@given(path=st.text(max_size=20), value=st.text(max_size=10))
def test_any_override_gives_a_recipe_or_a_kdforge_error(path, value):
    data = yaml.safe_load(yaml.safe_dump(raw()))
    try:
        apply_override(data, f"{path}={value}")
        parse_recipe(data)
    except KDForgeError:
        pass


def test_a_required_loss_parameter_is_named():
    with pytest.raises(RecipeError, match=r"objective\[1\].params.num_heads: 'value_relation' needs num_heads"):
        load_recipe(
            "digits_kd",
            ["objective[1].loss=value_relation", "objective[1].field=hidden_states", "objective[1].params={}"],
        )


MI_ALPHA = ["objective[1].loss=mi_alpha", "objective[1].field=hidden"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            [*MI_ALPHA, "objective[1].params={student_dim: 16, teacher_dim: 64, alfa: 0.5}"],
            "objective[1].params.alfa: 'mi_alpha' has no parameter 'alfa';"
            " known: alpha, critic, hidden, student_dim, teacher_dim",
        ),
        (
            [*MI_ALPHA, "objective[1].params={student_dim: 16}"],
            "objective[1].params.teacher_dim: 'mi_alpha' needs teacher_dim; set it in the term's params",
        ),
        (
            [*MI_ALPHA, "objective[1].params={student_dim: 16, teacher_dim: 64, alpha: 1.5}"],
            "objective[1].params: alpha must be in [0, 1] (1 = InfoNCE, 0 = NWJ), got 1.5",
        ),
        (
            [*MI_ALPHA, "objective[1].params={student_dim: 0, teacher_dim: 64}"],
            "objective[1].params: student_dim must be a positive integer, got 0",
        ),
        (
            # a size too large to allocate is refused by validation, which allocates nothing
            [*MI_ALPHA, "objective[1].params={student_dim: 1000000000000000, teacher_dim: 100000000000000}"],
            "objective[1].params: Storage size calculation overflowed",
        ),
        (
            ["objective[1].loss=dac_kl", "objective[1].params={initial_limits: [0.9, 0.1]}"],
            "objective[1].params: initial_limits must satisfy 0 < l < u < 1, got [0.9, 0.1]",
        ),
        (
            ["objective[1].loss=dac_kl", "objective[1].params={temprature: 2}"],
            "objective[1].params.temprature: 'dac_kl' has no parameter 'temprature';"
            " known: gate_temperature, hidden, initial_limits, limits, temperature, top_m",
        ),
        (
            [*MI_ALPHA, "objective[1].params={student_dim: 16, teacher_dim: 64}", "teacher=null"],
            "objective[1].loss: 'mi_alpha' compares with the teacher, but the recipe has no teacher;"
            " set teacher.model or use a labels-only loss such as cross_entropy",
        ),
    ],
)
def test_loss_module_terms_are_validated(overrides, message):
    with pytest.raises(RecipeError) as info:
        load_recipe("digits_kd", overrides)
    assert str(info.value).startswith(message)
    assert "\n" not in str(info.value)


def test_a_loss_module_term_as_written_in_a_recipe(tmp_path):
    text = find_recipe("digits_kd").read_text().split("objective:")[0] + (
        "objective:\n"
        "  - {loss: cross_entropy, weight: 0.5}\n"
        "  - {loss: mi_alpha, field: hidden, weight: 0.5, params: {alpha: 0.5, student_dim: 32, teacher_dim: 64}}\n"
        "training: {steps: 10}\n"
    )
    path = tmp_path / "mi.yaml"
    path.write_text(text)
    recipe = load_recipe(path)
    assert recipe.objective[1].params == {"alpha": 0.5, "student_dim": 32, "teacher_dim": 64}


def test_an_unknown_loss_lists_the_loss_modules_too():
    with pytest.raises(RecipeError, match=r"objective\[0\].loss: unknown loss 'nope'; known: .*dac_kl.*mi_alpha"):
        load_recipe("digits_kd", ["objective[0].loss=nope"])
