"""The loss registry: recipe names -> pure loss functions.

Every loss follows one contract (DESIGN.md):
``fn(student, teacher, *, mask=None, temperature=1.0, **params) -> scalar tensor``.
``target`` says what the second argument is: the teacher's output of the same
field (``"teacher"``), the batch's labels (``"labels"``), or nothing (``"none"``: a
regulariser on the student's output, such as FLOPS), so the objective knows what
to pass, and whether to run the teacher, without knowing the loss. A teacher loss that also needs the labels
(decoupled KD) sets ``needs_labels`` and receives them as ``labels=``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from kdforge.registry import Registry

LossFn = Callable[..., "object"]


@runtime_checkable
class TermState(Protocol):
    """State a loss term carries across steps (TAID's t, an adaptive temperature).

    The objective builds one per term from ``total_steps`` and the recipe params
    that name the class's constructor arguments, passes ``loss_params()`` to the
    loss on every call, reports each optimizer step's mean loss to ``update``, and
    checkpoints ``state_dict()``. ``provides`` names the loss parameters it sets.
    """

    provides: tuple[str, ...]

    def loss_params(self) -> dict[str, Any]: ...

    def update(self, loss_value: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def _keyword_params(fn: Callable, *, exclude: set[str]) -> set[str]:
    return {
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD) and p.name not in exclude
    }


@dataclass(frozen=True)
class LossSpec:
    name: str
    fn: LossFn
    target: Literal["teacher", "labels", "none"]
    summary: str
    needs_labels: bool = False
    state: type[TermState] | None = None
    #: parameters only code can pass (a projection module), not a recipe
    code_only: tuple[str, ...] = ()

    def loss_param_names(self) -> set[str]:
        """Keyword-only parameters of the loss function a recipe may set."""
        sig = inspect.signature(self.fn)
        provided = set(self.state.provides) if self.state else set()
        return {
            p.name
            for p in sig.parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in {"mask", "labels", *provided, *self.code_only}
        }

    def required_param_names(self) -> set[str]:
        """Loss parameters without a default: a recipe term must set them."""
        sig = inspect.signature(self.fn)
        return {name for name in self.loss_param_names() if sig.parameters[name].default is inspect.Parameter.empty}

    def state_param_names(self) -> set[str]:
        """Constructor arguments of the term's state a recipe may set."""
        if self.state is None:
            return set()
        return _keyword_params(self.state.__init__, exclude={"self", "total_steps"})

    def param_names(self) -> set[str]:
        """Every name a recipe may set in a term's ``params``."""
        return self.loss_param_names() | self.state_param_names()


LOSSES: Registry[LossSpec] = Registry("loss")


def register_loss(
    name: str,
    *,
    target: Literal["teacher", "labels", "none"] = "teacher",
    needs_labels: bool = False,
    state: type[TermState] | None = None,
    code_only: tuple[str, ...] = (),
):
    """Register ``fn`` under ``name``; its docstring's first line is its summary."""

    def decorate(fn: LossFn) -> LossFn:
        summary = (inspect.getdoc(fn) or "").strip().splitlines()[0] if fn.__doc__ else name
        spec = LossSpec(
            name=name,
            fn=fn,
            target=target,
            summary=summary,
            needs_labels=needs_labels,
            state=state,
            code_only=code_only,
        )
        LOSSES.add(name, spec)
        return fn

    return decorate


#: Loss modules with learnable parameters (a critic, a clipping network). Code uses
#: them directly; recipes cannot train loss parameters yet, so the objective does not.
LOSS_MODULES: Registry[type] = Registry("loss module")


def register_loss_module(name: str):
    """Register a learnable loss ``nn.Module`` class under ``name``."""
    return LOSS_MODULES.register(name)
