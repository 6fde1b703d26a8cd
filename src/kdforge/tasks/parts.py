"""The parts a task is wired from: a model family, a data source and an evaluator.

A :class:`ComposedTask` builds one of each in its ``__init__`` from the validated
recipe sections and implements the :class:`~kdforge.tasks.base.Task` interface by
delegating to them, so the runner, the engine and the signals call the same Task
methods as before. A part is written once and shared by every task that needs it
(the sentence-encoder family by ``embedding`` and ``ranking``, the ranking-pairs data
source by ``ranking`` and ``sparse_retriever``); a task reuses a part by building it,
never by subclassing another task.

The contracts are :class:`typing.Protocol` classes, checkable at run time
(``isinstance(part, ModelFamily)`` checks that the methods exist, not their
signatures; ``tests/tasks/test_parts.py`` checks each part).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from torch import nn
from torch.utils.data import Dataset, Sampler

from kdforge.models.refs import resolve_model_ref
from kdforge.outputs import ModelOutputs
from kdforge.recipe import Recipe
from kdforge.tasks.base import Evaluation, Splits, Task


@runtime_checkable
class ModelFamily(Protocol):
    """The models of one ecosystem: how teacher and student are made, run, saved and timed.

    - ``load_teacher(ref, field)``: the teacher ``ref`` (a recipe's ``teacher.model`` or an ensemble
      member's), loaded once per reference; errors name ``field``.
    - ``build_student()``: a freshly initialised student (the runner seeds the RNG first).
    - ``adapter(model, batch, fields)``: run a teacher or student on a collated batch and fill exactly
      ``fields`` of :class:`~kdforge.outputs.ModelOutputs` (the task's ``output_fields`` at most).
    - ``save_model(model, folder, card)`` writes the model in its ecosystem's format with ``card`` as
      README.md, atomically; ``load_saved(folder)`` reads it back; ``is_saved(folder)`` says whether a
      finished one is there; ``saved_weight_files(folder)`` lists the files that hold it (its size).
    - ``teacher_weight_files(ref, field)`` and ``tokenizer_files()``: what a teacher cache's fingerprint
      hashes.
    - ``throughput_batch(dataset, batch_size)``, ``forward_for_speed(model)`` and ``throughput_items(batch)``:
      the input speed is timed on, the forward timed, and how many items (``throughput_unit``) one pass
      processes.
    """

    def load_teacher(self, ref: str, field: str = "teacher.model") -> nn.Module: ...
    def build_student(self) -> nn.Module: ...
    def adapter(self, model: nn.Module, batch: dict[str, Any], fields: frozenset[str]) -> ModelOutputs: ...
    def save_model(self, model: nn.Module, folder: Path, card: str) -> Path: ...
    def load_saved(self, folder: Path) -> nn.Module: ...
    def is_saved(self, folder: Path) -> bool: ...
    def saved_weight_files(self, folder: Path) -> list[Path]: ...
    def teacher_weight_files(self, ref: str, field: str = "teacher.model") -> list[Path]: ...
    def tokenizer_files(self) -> list[Path]: ...
    def throughput_batch(self, dataset: Dataset, batch_size: int) -> dict[str, Any]: ...
    def forward_for_speed(self, model: nn.Module) -> Callable[[dict[str, Any]], Any]: ...
    def throughput_items(self, batch: dict[str, Any]) -> int: ...


@runtime_checkable
class DataSource(Protocol):
    """The training data: what examples there are, how they are batched, and what they are read from.

    - ``splits()``: :class:`~kdforge.tasks.base.Splits` (train, periodic-evaluation and test sets; the
      test set may be the evaluator's collection).
    - ``collate(items)``: a batch of training examples as the family's adapter reads it.
    - ``data_files()``: the files the examples are read from (a teacher cache's fingerprint hashes them).
    - ``train_sampler(seed)``: the order of training examples, or None (shuffled by the engine).
    - ``training_info(steps)``: what the report says of the training data.
    """

    def splits(self) -> Splits: ...
    def collate(self, items: list[Any]) -> dict[str, Any]: ...
    def data_files(self) -> list[Path]: ...
    def train_sampler(self, seed: int) -> Sampler[int] | None: ...
    def training_info(self, steps: int) -> dict[str, Any]: ...


@runtime_checkable
class Evaluator(Protocol):
    """How a model is judged on held-out data.

    - ``evaluate(model, dataset)``: :class:`~kdforge.tasks.base.Evaluation` of teacher, student or baseline
      on the test split; every model of a run is measured the same way.
    - ``primary_metric`` (a key of the metrics) and ``higher_is_better``: what "better" means in reports.
    - ``sample_generations(models, dataset)``: a few inputs with each model's output side by side, or None.
    """

    primary_metric: str
    higher_is_better: bool

    def evaluate(self, model: nn.Module, dataset: Dataset) -> Evaluation: ...
    def sample_generations(self, models: dict[str, nn.Module], dataset: Dataset) -> list[dict[str, str]] | None: ...


class ComposedTask(Task):
    """A task wired from parts: ``self.family``, ``self.data`` and ``self.evaluator``.

    A subclass names the classes of its parts in ``parts`` (family, data source, evaluator) and
    builds them in :meth:`build_parts` from ``self.recipe``, ``self.student_cfg`` and
    ``self.data_cfg``; every Task method below goes to the part that owns it. What the recipe
    checks and reports read before any task is built comes from the part classes: the
    evaluator's ``primary_metric`` and ``higher_is_better``, the family's ``throughput_unit``,
    ``card_library`` and ``load_hint``. The task itself declares its schemas, ``output_fields``
    (what its adapter gives for its batch layout: one family serves several layouts) and
    ``capabilities`` (a promise the task keeps with the methods it holds for them).
    """

    #: the classes of the family, the data source and the evaluator :meth:`build_parts` returns
    parts: ClassVar[tuple[type, type, type]]

    family: ModelFamily
    data: DataSource
    evaluator: Evaluator

    #: the class attributes a task takes from its family's class and from its evaluator's
    FROM_FAMILY = ("throughput_unit", "card_library", "load_hint")
    FROM_EVALUATOR = ("primary_metric", "higher_is_better")

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        parts = cls.__dict__.get("parts")
        if parts is None:
            return
        family, _, evaluator = parts
        for source, names in ((family, cls.FROM_FAMILY), (evaluator, cls.FROM_EVALUATOR)):
            for name in names:
                if name not in cls.__dict__ and hasattr(source, name):
                    setattr(cls, name, getattr(source, name))

    def __init__(self, recipe: Recipe):
        super().__init__(recipe)
        built = self.build_parts()
        for part, expected in zip(built, self.parts):
            if not isinstance(part, expected):  # the class attributes above came from these classes
                raise TypeError(f"{type(self).__name__}.build_parts gave a {type(part).__name__}, not {expected}")
        self.family, self.data, self.evaluator = built

    @abstractmethod
    def build_parts(self) -> tuple[ModelFamily, DataSource, Evaluator]:
        """The task's model family, data source and evaluator, built from the validated sections."""

    # ---- model family -------------------------------------------------------------------
    def load_teacher(self, ref: str, field: str = "teacher.model") -> nn.Module:
        return self.family.load_teacher(ref, field)

    def build_student(self) -> nn.Module:
        return self.family.build_student()

    def adapter(self, model: nn.Module, batch: dict[str, Any], fields: frozenset[str]) -> ModelOutputs:
        return self.family.adapter(model, batch, fields)

    def save_model(self, model: nn.Module, folder: Path, card: str) -> Path:
        return self.family.save_model(model, folder, card)

    def load_saved(self, folder: Path) -> nn.Module:
        return self.family.load_saved(folder)

    def is_saved(self, folder: Path) -> bool:
        return self.family.is_saved(folder)

    def saved_weight_files(self, folder: Path) -> list[Path]:
        return self.family.saved_weight_files(folder)

    def teacher_weight_files(self, ref: str, field: str = "teacher.model") -> list[Path]:
        return self.family.teacher_weight_files(ref, field)

    def tokenizer_files(self) -> list[Path]:
        return self.family.tokenizer_files()

    def throughput_batch(self, dataset: Dataset, batch_size: int) -> dict[str, Any]:
        return self.family.throughput_batch(dataset, batch_size)

    def forward_for_speed(self, model: nn.Module) -> Callable[[dict[str, Any]], Any]:
        return self.family.forward_for_speed(model)

    def throughput_items(self, batch: dict[str, Any]) -> int:
        return self.family.throughput_items(batch)

    # ---- data source --------------------------------------------------------------------
    def splits(self) -> Splits:
        return self.data.splits()

    def collate(self, items: list[Any]) -> dict[str, Any]:
        return self.data.collate(items)

    def data_files(self) -> list[Path]:
        return self.data.data_files()

    def train_sampler(self, seed: int) -> Sampler[int] | None:
        return self.data.train_sampler(seed)

    def training_info(self, steps: int) -> dict[str, Any]:
        # how the family built the student from the teacher (layers scored and kept, widths pruned)
        return {**self.data.training_info(steps), **getattr(self.family, "construction", {})}

    # ---- evaluator ----------------------------------------------------------------------
    def evaluate(self, model: nn.Module, dataset: Dataset) -> Evaluation:
        return self.evaluator.evaluate(model, dataset)

    def sample_generations(self, models: dict[str, nn.Module], dataset: Dataset) -> list[dict[str, str]] | None:
        return self.evaluator.sample_generations(models, dataset)


class SafetensorsFolderFamily:
    """The defaults most families share: a saved model is a folder with ``config.json`` and
    ``model.safetensors``, and a teacher's weights are the files its reference resolves to."""

    def is_saved(self, folder: Path) -> bool:
        return (folder / "config.json").exists()

    def saved_weight_files(self, folder: Path) -> list[Path]:
        return [folder / "model.safetensors"]

    def teacher_weight_files(self, ref: str, field: str = "teacher.model") -> list[Path]:
        return resolve_model_ref(ref, field=field).weight_files()
