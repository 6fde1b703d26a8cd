"""Teacher signals: where the teacher's knowledge comes from during training.

A signal answers one question: given a batch and the output fields the objective
needs, what did the teacher say? It never knows the student. Kinds are chosen in
the recipe (``teacher.signal``) and registered here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

from kdforge.outputs import ModelOutputs
from kdforge.registry import Registry

Batch = dict[str, Any]
#: ``adapter(model, batch, fields) -> ModelOutputs``: runs a model on a batch and fills the fields.
Adapter = Callable[[Any, Batch, frozenset[str]], ModelOutputs]


class TeacherSignal(ABC):
    @abstractmethod
    def outputs(self, batch: Batch, fields: frozenset[str]) -> ModelOutputs:
        """The teacher's outputs for ``batch``, with exactly ``fields`` filled."""


SIGNALS: Registry[type[TeacherSignal]] = Registry("teacher signal")
