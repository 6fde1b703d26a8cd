"""Property tests of the recipe loader: whatever the input, a Recipe or a KDForgeError, never another exception.

A user can write anything into a recipe file or a ``--set``; anything but a valid recipe
must come back as a :class:`KDForgeError` (one line, exit 2 in the CLI), never as a
traceback. Three sources of input: arbitrary YAML (text, and random nested mappings),
mutations of every bundled recipe (a key dropped, a value replaced by a random one, an
unknown key added, a value nested one level too deep), and arbitrary ``--set`` strings.

``plugins`` is never generated: it names modules to import by design, and random names
would import random modules of the standard library.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kdforge.checks import load_recipe, parse_recipe
from kdforge.errors import KDForgeError
from kdforge.recipe import Recipe, bundled_recipes, format_location, read_raw

BUNDLED = {name: read_raw(path) for name, path in sorted(bundled_recipes().items())}

#: the keys the schemas know, so that random mappings also reach the deeper checks
KNOWN_KEYS = sorted(
    {"name", "task", "teacher", "student", "data", "objective", "training", "evaluation", "output", "signal"}
    | {"loss", "field", "weight", "params", "model", "path", "lr", "steps", "epochs", "batch_size", "mask"}
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["classification", "causal_lm", "hinton_kd", "cache", "ensemble", "logits", "1e-3", "-1"]),
)
keys = st.one_of(st.text(max_size=12), st.sampled_from(KNOWN_KEYS)).filter(lambda k: k != "plugins")
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=12,
)


def outcome(load) -> Recipe | KDForgeError:
    """What loading gives: a Recipe, or the KDForgeError it raised; any other exception fails the test."""
    try:
        recipe = load()
    except KDForgeError as exc:
        assert str(exc).strip(), "an error without a message"
        return exc
    assert isinstance(recipe, Recipe)
    return recipe


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text, encoding="utf-8")
    return path


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(text=st.text(max_size=200))
def test_any_text_is_a_recipe_or_a_kdforge_error(tmp_path, text):
    assume("plugins" not in text)
    outcome(lambda: load_recipe(_write(tmp_path, text)))


@FAST
@given(text=st.text(alphabet=st.sampled_from(list(":-[]{}!&*#|>'\"%@`?,\n\t ab01.")), max_size=80))
def test_yaml_punctuation_is_a_recipe_or_a_kdforge_error(tmp_path, text):
    """Text made mostly of YAML's syntax characters: tags, anchors, flows, block scalars."""
    outcome(lambda: load_recipe(_write(tmp_path, text)))


@FAST
@given(data=st.dictionaries(keys, values, max_size=8))
def test_any_mapping_is_a_recipe_or_a_kdforge_error(tmp_path, data):
    outcome(lambda: load_recipe(_write(tmp_path, yaml.safe_dump(data))))


@FAST
@given(document=values)
def test_any_yaml_document_is_a_recipe_or_a_kdforge_error(tmp_path, document):
    outcome(lambda: load_recipe(_write(tmp_path, yaml.safe_dump(document))))


# ----- mutations of the bundled recipes ---------------------------------------------------


def paths_of(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a raw recipe (keys and list indices)."""
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            found += paths_of(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += paths_of(value, (*prefix, i))
    return found


def _parent(data: Any, path: tuple) -> Any:
    for part in path[:-1]:
        data = data[part]
    return data


@st.composite
def mutated(draw) -> dict[str, Any]:
    name = draw(st.sampled_from(sorted(BUNDLED)))
    data = copy.deepcopy(BUNDLED[name])
    for _ in range(draw(st.integers(1, 3))):
        paths = paths_of(data)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent, last = _parent(data, path), path[-1]
        kind = draw(st.sampled_from(["drop", "replace", "unknown key", "nest in a list", "nest in a mapping"]))
        if kind == "drop":
            del parent[last]
        elif kind == "replace":
            parent[last] = draw(values)
        elif kind == "unknown key":
            target = parent[last] if isinstance(parent[last], dict) else parent
            if isinstance(target, dict):
                target[draw(keys)] = draw(values)
        elif kind == "nest in a list":
            parent[last] = [parent[last]]
        else:
            parent[last] = {draw(keys): parent[last]}
    return data


@settings(max_examples=300, deadline=None)
@given(data=mutated())
def test_a_mutated_bundled_recipe_is_a_recipe_or_a_kdforge_error(data):
    outcome(lambda: parse_recipe(data))


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_every_bundled_recipe_parses(name):
    """The mutations start from valid recipes (so an error is the mutation's, not the recipe's)."""
    assert isinstance(parse_recipe(BUNDLED[name]), Recipe)


# ----- --set ---------------------------------------------------------------------------------

set_paths = st.one_of(
    st.text(max_size=30),
    st.sampled_from(sorted({format_location(p) for r in BUNDLED.values() for p in paths_of(r)})),
    st.sampled_from(
        ["objective[0]", "objective[9].weight", "training", "teacher", "data.x[3]", "a..b", "[0]", "x[-1]"]
    ),
)
set_values = st.one_of(
    st.text(max_size=30),
    values.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip().replace("\n", " ")),
)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(sorted(BUNDLED)), path=set_paths, value=set_values, raw=st.text(max_size=40))
def test_any_set_is_a_recipe_or_a_kdforge_error(name, path, value, raw):
    assume("plugins" not in path and "plugins" not in raw)
    outcome(lambda: parse_recipe(BUNDLED[name], [f"{path}={value}"]))
    outcome(lambda: parse_recipe(BUNDLED[name], [raw]))


# ----- objective terms: every registered loss, with random params, against every kind of teacher -------

TEACHERS = [
    None,
    {"model": "runs/t/model"},
    {"signal": "cache", "path": "c", "temperature": 2.0},
    {"signal": "served", "url": "http://127.0.0.1:9"},
    {"signal": "ensemble", "members": [{"model": "a"}, {"signal": "cache", "path": "c"}]},
]


@st.composite
def objective_terms(draw) -> dict[str, Any]:
    from kdforge.losses import LOSS_MODULES, LOSSES

    specs = {**dict(LOSSES.items()), **dict(LOSS_MODULES.items())}
    name = draw(st.sampled_from(sorted(specs)))
    param_names = sorted(specs[name].param_names()) or ["x"]
    params = draw(st.dictionaries(st.sampled_from([*param_names, "temperature", "bogus"]), values, max_size=4))
    term = {"loss": name, "field": draw(st.sampled_from(["logits", "hidden", "hidden_states", "attentions"]))}
    term["params"] = params
    for key in ("weight", "mask", "layer", "teacher_layer", "schedule"):
        if draw(st.booleans()):
            term[key] = draw(values)
    return term


@settings(max_examples=300, deadline=None)
@given(terms=st.lists(objective_terms(), min_size=1, max_size=3), teacher=st.sampled_from(TEACHERS))
def test_any_objective_is_a_recipe_or_a_kdforge_error(terms, teacher):
    """Loss params are free-form mappings: every check on them (sizes, temperatures) must say KDForgeError."""
    data = {**BUNDLED["digits_kd"], "objective": terms, "teacher": teacher}
    outcome(lambda: parse_recipe(data))


# ----- what random generation does not reach ---------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["student: " + "[" * 3000 + "]" * 3000, "student: " + "{a: " * 3000 + "1" + "}" * 3000],
    ids=["lists", "mappings"],
)
def test_yaml_nested_too_deeply_for_the_parser_is_a_kdforge_error(tmp_path, text):
    """PyYAML recurses once per level: thousands of brackets exhaust Python's stack (RecursionError)."""
    with pytest.raises(KDForgeError, match="nested too deeply"):
        load_recipe(_write(tmp_path, text))
    with pytest.raises(KDForgeError, match="nested too deeply"):
        parse_recipe(BUNDLED["digits_kd"], ["student.hidden=" + text.removeprefix("student: ")])


def test_a_billion_laughs_recipe_is_refused_at_once(tmp_path):
    """Aliases nested nine deep stand for 9**9 strings; the loader must not expand them into memory."""
    levels = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]" for i in range(8)
    ]
    assert isinstance(outcome(lambda: load_recipe(_write(tmp_path, "\n".join(levels)))), KDForgeError)


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_infinite_or_nan_numbers_are_refused(value):
    with pytest.raises(KDForgeError, match="training.lr: input should be a finite number"):
        parse_recipe(BUNDLED["digits_kd"], [f"training.lr={value}"])
