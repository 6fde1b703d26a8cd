"""Every registered loss keeps the loss contract of DESIGN.md."""

import inspect

import pytest

from kdforge.losses import LOSS_MODULES, LOSSES


@pytest.mark.parametrize("name", list(LOSSES))
def test_registered_losses_follow_the_contract(name):
    spec = LOSSES.get(name)
    params = list(inspect.signature(spec.fn).parameters.values())
    positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert len(positional) >= 2, "fn(student, teacher_or_labels, ...)"
    keyword = {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert "mask" in keyword and keyword["mask"].default is None
    required = {n for n, p in keyword.items() if p.default is inspect.Parameter.empty}
    provided = set(spec.state.provides) if spec.state else set()
    assert spec.required_param_names() == required - provided
    doc = inspect.getdoc(spec.fn) or ""
    assert spec.summary, f"{name}: the docstring's first line is its summary"
    assert "Args" in doc or "shapes" in doc.lower(), f"{name}: the docstring states its input shapes"


@pytest.mark.parametrize("name", list(LOSS_MODULES))
def test_registered_loss_modules_follow_the_contract(name):
    spec = LOSS_MODULES.get(name)
    params = list(inspect.signature(spec.cls.forward).parameters.values())
    positional = [p for p in params if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [p.name for p in positional[:1]] == ["self"] and len(positional) >= 3, "forward(student, teacher, ...)"
    keyword = {p.name: p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert "mask" in keyword and keyword["mask"].default is None
    assert name not in LOSSES, "a recipe's loss name must mean one thing"
    assert not spec.init_param_names() & spec.loss_param_names()
    assert spec.summary
    # every constructor default is a valid module: only the required sizes must come from the recipe
    spec.check_params({p: 4 for p in spec.required_param_names()})
