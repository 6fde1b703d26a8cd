"""The task interface: everything that differs between kinds of distillation.

A task turns a recipe into datasets, a student, a teacher, adapters that expose
named outputs, an evaluator and a labels-only objective for the baseline. The
runner and the engine call only this interface, so a new task is one new module
registered in :data:`TASKS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import Dataset, Sampler

from kdforge.outputs import ModelOutputs
from kdforge.provenance import Paper
from kdforge.recipe import ObjectiveTerm, Recipe
from kdforge.registry import Registry


@dataclass
class Splits:
    train: Dataset
    eval: Dataset  # periodic evaluation during training
    test: Dataset  # the final, reported evaluation
    eval_name: str = "validation"


@dataclass
class Evaluation:
    """Task metrics of one model on one split, plus the outputs fidelity is measured on."""

    metrics: dict[str, float]
    logits: torch.Tensor | None = None


class Task(ABC):
    name: ClassVar[str]
    student_schema: ClassVar[type[BaseModel]]
    data_schema: ClassVar[type[BaseModel]]
    output_fields: ClassVar[tuple[str, ...]]
    #: metric that decides "better" in reports, and whether higher is better
    primary_metric: ClassVar[str]
    higher_is_better: ClassVar[bool] = True
    #: Python that loads a saved model, for its model card ("{folder}" is filled in)
    load_hint: ClassVar[str]
    #: the model card's library_name (where the Hub files the saved model)
    card_library: ClassVar[str] = "kdforge"
    #: whether the task saves its models in the dtype ``output.dtype`` names (others save what they train)
    saves_dtype: ClassVar[bool] = False
    #: what the task offers methods (kdforge.methods.base.CAPABILITIES): a method that needs more is refused.
    #: A capability is also what the task then gives the method:
    #: ``writes_text`` (on_policy): ``tokenizer``, ``pad_id``, ``stop_ids(model)``, ``max_length``, ``kinds``;
    #: and (teacher_generated, online_generation, step_by_step, teacher_hacking_monitor)
    #: ``use_responses(ResponseSource)`` and ``monitor_teacher_hacking(settings, where)``;
    #: ``has_pairs`` (tasb_batches): ``triples`` (each example's ``query`` and teacher ``margin``) and
    #: ``query_clusters(n)``; ``labelled_texts`` (pgkd): ``labelled_texts(dataset)``, ``dataset_of(examples)``
    capabilities: ClassVar[frozenset[str]] = frozenset()
    #: the paper whose method the task itself is (Distill-VQ's index), for model cards' citations; None for a
    #: task that many papers' methods run on
    paper: ClassVar[Paper | None] = None

    def __init__(self, recipe: Recipe):
        self.recipe = recipe
        self.student_cfg = self.student_schema.model_validate(recipe.student)
        self.data_cfg = self.data_schema.model_validate(recipe.data)

    @abstractmethod
    def splits(self) -> Splits: ...

    @abstractmethod
    def collate(self, items: list[Any]) -> dict[str, Any]: ...

    @abstractmethod
    def build_student(self) -> nn.Module:
        """A freshly initialised student (the RNG is seeded before the call)."""

    @abstractmethod
    def load_teacher(self, ref: str, field: str = "teacher.model") -> nn.Module:
        """The teacher model ``ref`` (a recipe's ``teacher.model``, or an ensemble member's); errors name ``field``."""

    @abstractmethod
    def adapter(self, model: nn.Module, batch: dict[str, Any], fields: frozenset[str]) -> ModelOutputs:
        """Run ``model`` on ``batch`` and fill exactly ``fields``."""

    @abstractmethod
    def evaluate(self, model: nn.Module, dataset: Dataset) -> Evaluation: ...

    @abstractmethod
    def save_model(self, model: nn.Module, folder: Path, card: str) -> Path:
        """Save in the model's own ecosystem format, with ``card`` as README.md."""

    @abstractmethod
    def load_saved(self, folder: Path) -> nn.Module:
        """Load what :meth:`save_model` wrote (used by ``--resume`` of finished phases)."""

    def saved_weight_files(self, folder: Path) -> list[Path]:
        """The files of a :meth:`save_model` folder that hold the model (its size in reports)."""
        return [folder / "model.safetensors"]

    def is_saved(self, folder: Path) -> bool:
        """Whether ``folder`` holds a finished :meth:`save_model` (``--resume`` then loads it)."""
        return (folder / "config.json").exists()

    @classmethod
    def check_sections(cls, recipe: Recipe, data_cfg: Any) -> None:
        """Rules between the validated ``data`` section and the rest of the recipe (the objective a
        multi-label data section needs); raise :class:`~kdforge.errors.RecipeError` naming the field."""
        return None

    def baseline_objective(self) -> list[ObjectiveTerm] | None:
        """The no-distillation objective: labels only; None where the data has no labels (the
        baseline is then the student as initialised, untrained)."""
        return [ObjectiveTerm(loss="cross_entropy", field="logits", weight=1.0)]

    def train_sampler(self, seed: int) -> Sampler[int] | None:
        """The order of training examples, when the task composes its batches (TAS-B); None: shuffled."""
        return None

    def training_batch(self, model: nn.Module, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """The batch a distillation step trains on: ``batch`` itself, unless the task makes its own
        from the student (on-policy distillation samples the student's answers)."""
        return batch

    def training_info(self, steps: int) -> dict[str, Any]:
        """What the report says about the distillation data of a run of ``steps`` optimizer steps."""
        return {}

    def review_evaluations(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Findings from a phase's periodic evaluations (``{"step", "eval"}`` records) for the report."""
        return {}

    #: what :meth:`throughput_items` counts, per second, in reports
    throughput_unit: ClassVar[str] = "examples/s"

    def throughput_items(self, batch: dict[str, Any]) -> int:
        """How many items (examples, tokens) one timed pass over ``batch`` processes."""
        return len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))

    def sample_generations(self, models: dict[str, nn.Module], dataset: Dataset) -> list[dict[str, str]] | None:
        """A few held-out inputs with each model's output side by side (generative tasks), or None."""
        return None

    def teacher_weight_files(self, ref: str, field: str = "teacher.model") -> list[Path]:
        """The weight files of teacher ``ref`` (for sizes on disk and cache fingerprints)."""
        return []

    def data_files(self) -> list[Path]:
        """Files the datasets are read from (their contents go into a teacher cache's fingerprint)."""
        return []

    def data_identity(self) -> dict[str, Any]:
        """Settings beyond the recipe's ``data`` section that decide the datasets (a method's, handed to the
        task), for a teacher cache's fingerprint; empty for none."""
        return {}

    def tokenizer_files(self) -> list[Path]:
        """The teacher's tokenizer files (a cache is valid only for the same tokenizer)."""
        return []

    def throughput_batch(self, dataset: Dataset, batch_size: int) -> dict[str, Any]:
        """A batch used to time inference."""
        items = [dataset[i % len(dataset)] for i in range(batch_size)]
        return self.collate(items)

    def forward_for_speed(self, model: nn.Module) -> Callable[[dict[str, Any]], Any]:
        return lambda batch: self.adapter(model, batch, frozenset({"logits"}))


TASKS: Registry[type[Task]] = Registry("task")


def refuse_moved_settings(data: Any, moved: dict[str, str]) -> Any:
    """A ``data`` section that still holds a method's settings (``data.pgkd``, before methods had a list of
    their own) is refused with the new spelling (use as a pydantic ``model_validator(mode="before")``)."""
    if isinstance(data, dict):
        for old, method in moved.items():
            if old in data:
                raise ValueError(
                    f"data.{old} moved to the recipe's methods list; write methods: [{{name: {method}, ...}}]"
                    f" with the same settings, and remove data.{old}"
                )
    return data


#: the data fields of round 1 that are methods now, and the method each became
MOVED_TO_METHODS = {"prune": "data_pruning", "selection": "active_distillation", "pgkd": "pgkd"}
