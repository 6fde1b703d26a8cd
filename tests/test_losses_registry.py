"""Every registered loss keeps the loss contract of DESIGN.md."""

import inspect

import pytest

from kdforge.losses import LOSSES


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
