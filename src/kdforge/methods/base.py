"""The method contract: one method of the papers, one module, registered in :data:`METHODS`.

A recipe lists its methods (``methods: [{name: pgkd, rounds: 3}]``). Each is a class with
its own pydantic schema (the entry's settings), its paper, the capabilities it needs from
the task, and hooks the runner calls at fixed points of a run. The runner knows no
method by name: it calls every hook of every listed method, and each hook does nothing
unless the method overrides it. A new method is one new file here, imported by
``kdforge/methods/__init__.py``.

The hooks, in the order of a run:

- :meth:`Method.configure_task`: right after each task is built, for a run (the recipe's task
  and each seed's) or for ``kdforge cache`` (``kdforge.commands.build_task``), before the task
  makes its splits (teacher_generated hands the causal-LM task where its responses come from);
- :meth:`Method.prepare_splits`: once, before any seed (data pruning cuts the training set);
- :meth:`Method.train_student`: instead of the one training phase (rounds: active
  distillation, PGKD); at most one method of a recipe may do this;
- :meth:`Method.train_sampler`, :meth:`Method.training_batch`, :meth:`Method.teacher_outputs`:
  inside each distillation step (TAS-B's batches, on-policy samples, a mixed target);
- :meth:`Method.baseline_plan`: what the no-distillation baseline trains on, and how long;
- :meth:`Method.review_evaluations`: findings from the periodic evaluations;
- :meth:`Method.report_html`: the method's own section of report.html.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import ValidationError

from kdforge.errors import RecipeError
from kdforge.provenance import Paper
from kdforge.recipe import Recipe, Strict, validation_error
from kdforge.registry import Registry

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.data import Dataset, Sampler

    from kdforge.outputs import ModelOutputs
    from kdforge.signals.base import TeacherSignal
    from kdforge.tasks.base import Splits, Task


class NoSettings(Strict):
    """A method without settings of its own."""


@dataclass
class StudentRun:
    """What the runner hands a method that trains the student its own way (in rounds)."""

    task: Task
    splits: Splits
    #: the teacher's signal, and its model when one local model stands behind it
    signal: TeacherSignal | None
    teacher_model: nn.Module | None
    #: the teacher fields the objective compares
    teacher_fields: frozenset[str]
    #: ``train(model, dataset, signal=None)``: the next round, ``model`` (None: a fresh student)
    #: trained on ``dataset``; ``save(model, **about)`` keeps the student and returns its training info
    rounds: Any
    #: the student's metrics on the evaluation split (computed by the main process, shared)
    evaluate: Callable[[nn.Module], dict[str, float]]
    #: runs a function on the main process only and gives every process its result
    on_main: Callable[..., Any]


@dataclass
class BaselinePlan:
    """What the labels-only baseline trains on (None: the training split) and for how many steps (None: as
    the recipe says)."""

    train_set: Dataset | None = None
    steps: int | None = None


class Method:
    """One distillation method of the papers. Subclasses set the class attributes and override hooks."""

    #: the name a recipe lists it by
    name: ClassVar[str]
    #: one line, for ``kdforge list --methods`` and the README's table
    summary: ClassVar[str]
    paper: ClassVar[Paper | None] = None
    #: the schema of the recipe entry's settings (every key but ``name``)
    settings: ClassVar[type[Strict]] = NoSettings
    #: capabilities the task must offer (``Task.capabilities``), e.g. ``{"has_labels"}``
    requires: ClassVar[frozenset[str]] = frozenset()
    needs_teacher: ClassVar[bool] = False
    #: the method carries the teacher's knowledge itself (a teacher writes the training data), so the run
    #: distils, and gets a baseline, even when no objective term compares with the teacher
    distils: ClassVar[bool] = False
    #: the method trains the student itself (:meth:`train_student`)
    trains_student: ClassVar[bool] = False
    #: methods a recipe cannot list together with this one
    excludes: ClassVar[frozenset[str]] = frozenset()
    #: the method calls the teacher only inside training steps (on every process together) or before
    #: the student's training starts, never on one process alone during or after it: a sharded teacher
    #: (training.sharding: fsdp), which every process must run together, can serve it
    teacher_in_steps_only: ClassVar[bool] = False

    def __init__(self, cfg: Strict, task: Task, where: str = "methods"):
        self.cfg = cfg
        self.task = task
        #: the recipe path of this method's entry (``methods[1]``), which its errors name
        self.where = where

    # ----- checks before anything runs ---------------------------------------------------

    @classmethod
    def check(cls, cfg: Strict, recipe: Recipe, where: str) -> None:
        """Mistakes in how the recipe combines this method with the rest (raise a RecipeError naming ``where``)."""

    # ----- hooks -------------------------------------------------------------------------

    def configure_task(self, task: Task) -> None:
        """Set up ``task`` before it makes its splits; called on every task built for the recipe (a run's,
        each seed's, the one ``kdforge cache`` writes the teacher's outputs for), so all see the same data.

        A method that changes how the task makes its data hands the task an object of a protocol the task
        defines (the causal-LM task's ``use_responses(ResponseSource(...))``): tasks never import methods.
        Default: nothing.
        """

    def prepare_splits(self, splits: Splits, teacher_model: nn.Module | None) -> tuple[Splits, dict[str, Any]]:
        """The splits every seed trains on, and what the report says of them (under ``data_plan``)."""
        return splits, {}

    def train_student(self, run: StudentRun, resume: bool) -> tuple[nn.Module, dict[str, Any]]:
        """The trained student and its training info (only when :attr:`trains_student`)."""
        raise NotImplementedError

    def train_sampler(self, seed: int) -> Sampler[int] | None:
        """The order of the student's training examples; None leaves it shuffled."""
        return None

    def training_batch(self, model: nn.Module, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """The batch a distillation step trains on (default: ``batch`` itself)."""
        return batch

    def teacher_outputs(self, batch: dict[str, Any], outputs: ModelOutputs, step: int) -> ModelOutputs:
        """The teacher's outputs as the objective sees them (default: unchanged)."""
        return outputs

    def baseline_plan(self, pool: Dataset, student_train: dict[str, Any]) -> BaselinePlan | None:
        """How the baseline trains when this method changes it; None leaves it alone."""
        return None

    def training_info(self, steps: int) -> dict[str, Any]:
        """What the report says about the student's training under this method."""
        return {}

    def review_evaluations(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Findings from the student's periodic evaluations (``{"step", "eval"}`` records)."""
        return {}

    @classmethod
    def report_html(cls, report: dict[str, Any], render: Callable[[str], str]) -> str:
        """The method's section of report.html from report.json (``render(template)`` fills a Jinja
        template with ``report``, ``train``, the student's training info of the first seed, and
        ``settings``, this method's recipe entry); empty for none."""
        return ""

    @classmethod
    def report_figures(cls, report: dict[str, Any], run_dir: Path) -> list[tuple[str, bytes | None]]:
        """``(title, png)`` figures of report.html."""
        return []


METHODS: Registry[type[Method]] = Registry("method")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: ``@register_method`` on a :class:`Method` subclass registers it under its ``name``."""
    METHODS.add(cls.name, cls)
    return cls


def settings_of(entry: dict[str, Any], where: str) -> tuple[type[Method], Strict]:
    """The registered class of a recipe's ``methods[i]`` entry and its validated settings."""
    cls = METHODS.get(entry["name"], field=f"{where}.name")
    try:
        cfg = cls.settings.model_validate({k: v for k, v in entry.items() if k != "name"})
    except ValidationError as exc:
        raise validation_error(exc, tuple(_where_parts(where))) from None
    return cls, cfg


def _where_parts(where: str) -> list[Any]:
    name, _, index = where.partition("[")
    return [name, int(index.rstrip("]"))] if index else [name]


def check_methods(recipe: Recipe, capabilities: frozenset[str], task_name: str) -> None:
    """Every listed method is registered, its settings are valid, and the task offers what it needs."""
    owners = []
    for i, entry in enumerate(recipe.methods):
        where = f"methods[{i}]"
        cls, cfg = settings_of(entry, where)
        missing = sorted(cls.requires - capabilities)
        if missing:
            raise RecipeError(
                f"{where}.name: method {cls.name!r} needs a task that {_capability_phrase(missing[0])},"
                f" and task {task_name!r} does not ({missing[0]}); use a task that offers it or drop the method"
            )
        if cls.needs_teacher and recipe.teacher is None:
            raise RecipeError(f"{where}.name: method {cls.name!r} needs a teacher; add a teacher section")
        if cls.trains_student:
            owners.append(cls.name)
            if len(owners) > 1:
                raise RecipeError(
                    f"methods: {owners[0]} and {owners[1]} each train the student in their own rounds; use one of them"
                )
        clash = sorted(cls.excludes & set(recipe.method_names()))
        if clash:
            raise RecipeError(f"{where}.name: {cls.name} and {clash[0]} cannot be combined; list one of them, not both")
        cls.check(cfg, recipe, where)


#: what each capability means, in the words of an error message
CAPABILITIES = {
    "has_labels": "has class labels",
    "gives_logits": "gives class logits in evaluation",
    "labelled_texts": "trains on labelled texts a generative teacher can add to",
    "writes_text": "trains on text a teacher can write (prompts and responses)",
    "has_pairs": "trains on (query, document) pairs",
}


def _capability_phrase(name: str) -> str:
    return CAPABILITIES.get(name, f"offers {name}")


def build_methods(recipe: Recipe, task: Task) -> list[Method]:
    """The recipe's methods, each built with its validated settings, in the recipe's order."""
    built = []
    for i, entry in enumerate(recipe.methods):
        cls, cfg = settings_of(entry, f"methods[{i}]")
        built.append(cls(cfg, task, f"methods[{i}]"))
    return built
