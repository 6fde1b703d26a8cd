"""The loss registry: recipe names -> pure loss functions.

Every loss follows one contract (DESIGN.md):
``fn(student, teacher, *, mask=None, temperature=1.0, **params) -> scalar tensor``.
``target`` says what the second argument is: the teacher's output of the same
field (``"teacher"``), the batch's labels (``"labels"``), or nothing (``"none"``: a
regulariser on the student's output, such as FLOPS), so the objective knows what
to pass, and whether to run the teacher, without knowing the loss. A teacher loss that also needs the labels
(decoupled KD) sets ``needs_labels`` and receives them as ``labels=``.

Learnable loss modules (``nn.Module`` classes with the same call contract) have their
own registry, :data:`LOSS_MODULES`; a recipe term names either kind in ``loss``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

from kdforge.errors import RecipeError
from kdforge.provenance import Paper
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
    #: the value couples the rows of a batch (a transport plan, a batch mean inside a square,
    #: in-batch negatives): on several processes its inputs are gathered from all of them
    couples_batch: bool = False
    #: the paper the loss comes from (README's table, ``kdforge list``, model cards' citations)
    paper: Paper | None = None
    #: the loss takes :class:`~kdforge.losses.linear.HeadLogits` for its logits (the fused linear
    #: path: the task may hand it the last hidden states and the LM head instead of the logits)
    linear: bool = False

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
    couples_batch: bool = False,
    paper: Paper | None = None,
    linear: bool = False,
):
    """Register ``fn`` under ``name``; its docstring's first line is its summary, ``paper`` its source.

    A loss that averages over positions or rows does so with
    :func:`kdforge.losses.common.masked_mean`, which is what makes it exact on several
    processes; one whose value is not such a mean sets ``couples_batch``.
    """

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
            couples_batch=couples_batch,
            paper=paper,
            linear=linear,
        )
        if name in LOSS_MODULES:
            raise ValueError(f"loss {name!r} has the name of a registered loss module")
        LOSSES.add(name, spec)
        return fn

    return decorate


#: what a loss module's constructor raises for values it refuses (a huge size overflows)
MODULE_PARAM_ERRORS = (ValueError, TypeError, RuntimeError, OverflowError)


class SizeMismatch(ValueError):
    """An input's size differs from the size a loss module was built with.

    A module raises it so that the objective can name the recipe parameter to change;
    ``param`` is the constructor argument, ``side`` is ``"student"`` or ``"teacher"``.
    """

    def __init__(self, message: str, *, param: str, expected: int, actual: int, side: str) -> None:
        super().__init__(message)
        self.param, self.expected, self.actual, self.side = param, expected, actual, side


@dataclass(frozen=True)
class LossModuleSpec:
    """A learnable loss ``nn.Module`` class and what a recipe term may set on it.

    The class's constructor arguments are built once per term from the term's
    ``params``; its ``forward(student, teacher, *, mask=None, **params)`` follows the
    loss contract on tensors, and the term's remaining params (``forward``'s
    keyword-only arguments) are passed on every call.
    """

    name: str
    cls: type
    target: Literal["teacher", "labels", "none"]
    summary: str
    needs_labels: bool = False
    #: as :attr:`LossSpec.couples_batch`
    couples_batch: bool = False
    #: as :attr:`LossSpec.paper`
    paper: Paper | None = None

    def init_param_names(self) -> set[str]:
        return _keyword_params(self.cls.__init__, exclude={"self"})

    def loss_param_names(self) -> set[str]:
        """Keyword-only arguments of ``forward`` a recipe may set."""
        return {
            p.name
            for p in inspect.signature(self.cls.forward).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in {"mask", "labels"}
        }

    def param_names(self) -> set[str]:
        return self.init_param_names() | self.loss_param_names()

    def required_param_names(self) -> set[str]:
        """Arguments without a default (a module's sizes, typically): a recipe term must set them."""
        required = set()
        for fn, names in ((self.cls.__init__, self.init_param_names()), (self.cls.forward, self.loss_param_names())):
            sig = inspect.signature(fn)
            required |= {n for n in names if sig.parameters[n].default is inspect.Parameter.empty}
        return required

    def split_params(self, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """A term's params as (constructor arguments, ``forward`` arguments)."""
        init = self.init_param_names()
        return {k: v for k, v in params.items() if k in init}, {k: v for k, v in params.items() if k not in init}

    def check_params(self, params: dict[str, Any]) -> None:
        """Build the module on the meta device: its constructor checks the values, nothing is allocated."""
        init, _ = self.split_params(params)
        with torch.device("meta"):
            self.cls(**init)


#: Loss modules with learnable parameters (a critic, a clipping network). A recipe term
#: names one like a loss; the objective builds it and the engine trains its parameters
#: with the student's.
LOSS_MODULES: Registry[LossModuleSpec] = Registry("loss module")


def register_loss_module(
    name: str,
    *,
    target: Literal["teacher", "labels", "none"] = "teacher",
    couples_batch: bool = False,
    paper: Paper | None = None,
):
    """Register a learnable loss ``nn.Module`` class under ``name``; its docstring's first line is its summary,
    ``paper`` its source."""

    def decorate(cls: type) -> type:
        doc = (inspect.getdoc(cls) or "").strip().splitlines()
        spec = LossModuleSpec(
            name=name,
            cls=cls,
            target=target,
            summary=doc[0] if doc else name,
            couples_batch=couples_batch,
            paper=paper,
        )
        # a name in both signatures would be ambiguous in a recipe's params
        both = spec.init_param_names() & spec.loss_param_names()
        if both:
            raise ValueError(f"loss module {name!r}: {', '.join(sorted(both))} in both __init__ and forward")
        if name in LOSSES:
            raise ValueError(f"loss module {name!r} has the name of a registered loss")
        LOSS_MODULES.add(name, spec)
        return cls

    return decorate


def find_term_loss(name: str, *, field: str) -> LossSpec | LossModuleSpec:
    """The loss or loss module a recipe term names; an unknown name lists both kinds."""
    if name in LOSS_MODULES:
        return LOSS_MODULES.get(name)
    if name in LOSSES:
        return LOSSES.get(name)
    known = ", ".join(sorted([*LOSSES, *LOSS_MODULES]))
    raise RecipeError(f"{field}: unknown loss {name!r}; known: {known}")
