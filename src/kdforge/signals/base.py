"""Teacher signals: where the teacher's knowledge comes from during training.

A signal answers one question: given a batch and the output fields the objective
needs, what did the teacher say? It never knows the student. Each kind is one module
that registers its :class:`TeacherSignal` in :data:`SIGNALS` under the name a recipe's
``teacher.signal`` gives, with two class attributes: :attr:`TeacherSignal.config`, the
pydantic schema of its ``teacher`` section (a :class:`SignalConfig`), and
:meth:`TeacherSignal.from_config`, which builds the signal for a task. Nothing else
names the kinds: :func:`teacher_config` validates a recipe's teacher section against
the registered schemas and :func:`build_signal` builds it, so a new signal is one file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic_core import PydanticKnownError

from kdforge.outputs import ModelOutputs
from kdforge.recipe import Strict
from kdforge.registry import Registry

if TYPE_CHECKING:
    from torch import nn

Batch = dict[str, Any]
#: ``adapter(model, batch, fields) -> ModelOutputs``: runs a model on a batch and fills the fields.
Adapter = Callable[[Any, Batch, frozenset[str]], ModelOutputs]

#: the signal of a teacher section (or an ensemble member) that names none
DEFAULT_SIGNAL = "online"


class SignalConfig(Strict):
    """A recipe's ``teacher`` section (or one member of an ensemble) for one kind of signal.

    Each subclass declares ``signal: Literal[NAME]`` (its registered name) first, then its
    own fields. What the recipe checks and the reports need to know of a kind is asked here,
    never by testing which class a section is.
    """

    #: the signal gives the teacher's logits as top-k log-probs, and no other output field
    topk_logits_only: ClassVar[bool] = False

    def label(self) -> str:
        """The teacher in one phrase, for reports and cards: its model, its server, or its members."""
        raise NotImplementedError

    def stored_temperature(self) -> float | None:
        """The temperature of the log-probs the signal holds when they were taken ahead of the
        run (a cache, a server); None when the teacher's logits are computed during the run."""
        return None

    def teachers(self, where: str) -> list[tuple[str, SignalConfig]]:
        """The single teachers behind this section, each with its place in the recipe."""
        return [(where, self)]


def teacher_members(cfg: SignalConfig | None, where: str = "teacher") -> list[tuple[str, SignalConfig]]:
    """``(recipe path, section)`` of each single teacher of a teacher section: the section itself
    (``teacher``), or each member of an ensemble (``teacher.members[i]``); none without a teacher."""
    return [] if cfg is None else cfg.teachers(where)


@dataclass
class BuiltSignal:
    signal: TeacherSignal
    #: the teacher model to evaluate for the report, when there is exactly one
    model: nn.Module | None = None
    model_ref: str | None = None
    #: what the report says about the signal (kind, cache statistics)
    info: dict[str, Any] = field(default_factory=dict)


class TeacherSignal(ABC):
    #: the schema of the recipe's ``teacher`` section for this kind; None: not built from a recipe
    config: ClassVar[type[SignalConfig] | None] = None
    #: whether an ensemble may list it among its members (an ensemble itself may not)
    ensemble_member: ClassVar[bool] = True

    @abstractmethod
    def outputs(self, batch: Batch, fields: frozenset[str]) -> ModelOutputs:
        """The teacher's outputs for ``batch``, with exactly ``fields`` filled."""

    @classmethod
    def from_config(cls, task: Any, cfg: Any, teacher_fields: frozenset[str], where: str) -> BuiltSignal:
        """The signal ``cfg`` (a section of :attr:`config`) describes, for ``task`` (which loads teacher
        models and gives the adapter); ``where`` is the section's place in the recipe, for errors."""
        raise NotImplementedError(f"{cls.__name__} is not built from a recipe")


SIGNALS: Registry[type[TeacherSignal]] = Registry("teacher signal")


def build_signal(task: Any, cfg: SignalConfig, teacher_fields: frozenset[str], where: str = "teacher") -> BuiltSignal:
    """The teacher signal a recipe's ``teacher`` section describes, built for ``task`` by its kind."""
    return SIGNALS.get(cfg.signal, field=f"{where}.signal").from_config(task, cfg, teacher_fields, where)


def signal_names(*, members: bool = False) -> list[str]:
    """The signals a teacher section may name, as errors list them: the default first, then the
    other single teachers, then those made of others (an ensemble); ``members``: those an ensemble may hold."""
    kinds = {name: SIGNALS.get(name) for name in SIGNALS if SIGNALS.get(name).config is not None}
    single = [name for name, kind in kinds.items() if kind.ensemble_member]
    combined = [] if members else [name for name, kind in kinds.items() if not kind.ensemble_member]
    return sorted(single, key=lambda name: name != DEFAULT_SIGNAL) + combined


def teacher_config(value: Any, *, member: bool = False) -> SignalConfig:
    """A recipe's ``teacher`` section (``member``: one member of an ensemble) validated by the schema
    of the signal it names (``signal``, default online).

    Called inside pydantic validation (the recipe's ``teacher`` field, an ensemble's ``members``):
    its errors are pydantic's, so that they carry the field path (``teacher.members[0].url``).
    """
    allowed = signal_names(members=member)
    if isinstance(value, SignalConfig):
        tag: Any = value.signal
    elif isinstance(value, dict):
        tag = value.get("signal", DEFAULT_SIGNAL)
    else:
        raise PydanticKnownError("model_attributes_type")
    if not isinstance(tag, str) or tag not in allowed:
        expected = ", ".join(f"'{name}'" for name in allowed)
        raise PydanticKnownError(
            "union_tag_invalid", {"discriminator": "'signal'", "tag": str(tag), "expected_tags": expected}
        )
    if isinstance(value, SignalConfig):
        return value
    schema = SIGNALS.get(tag).config
    assert schema is not None
    return schema.model_validate({"signal": tag, **value})
