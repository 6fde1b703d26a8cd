"""Active distillation: the teacher's outputs are bought point by point, under a budget.

The student trains in rounds; after each round a strategy (:mod:`.strategies`: random,
margin, or robust active distillation) picks the next points whose teacher outputs are
bought. Each point is queried once; its outputs are kept and served back by
:class:`QueriedTeacher` in later rounds, so the count of teacher queries in the report
is the number of distinct points the teacher has seen. The baseline trains on as many
random labelled points, as many optimizer steps.

A recipe: ``methods: [{name: active_distillation, strategy: rad, budget: 200, rounds: 4}]``.
Works on any task whose ``evaluate`` returns logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from kdforge.data.indexed import INDEX_KEY
from kdforge.errors import RecipeError
from kdforge.methods.active_distillation.strategies import Selection, choose, teacher_error_rate
from kdforge.methods.base import BaselinePlan, Method, StudentRun, register_method
from kdforge.outputs import ModelOutputs
from kdforge.provenance import Paper
from kdforge.signals.base import Batch, TeacherSignal
from kdforge.tasks.base import Task


class QueriedTeacher(TeacherSignal):
    """The teacher's logits of points bought earlier, looked up by position (no new query)."""

    def __init__(self, bought: dict[int, torch.Tensor], positions: np.ndarray):
        self.bought = bought
        self.positions = positions  # round dataset position -> pool position

    def outputs(self, batch: Batch, fields: frozenset[str]) -> ModelOutputs:
        rows = [self.bought[int(self.positions[i])] for i in batch[INDEX_KEY].tolist()]
        return ModelOutputs(logits=torch.stack(rows).to(batch["labels"].device if "labels" in batch else "cpu"))


@dataclass
class SelectionLog:
    """What the report says about an active-distillation run."""

    strategy: str
    budget: int
    queries: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "budget": self.budget,
            "teacher_queries": self.queries,
            "rounds": self.rounds,
        }


def query_teacher(
    task: Task, signal: TeacherSignal, pool: Dataset, positions: np.ndarray, batch_size: int
) -> torch.Tensor:
    """The teacher's logits [len(positions), C] for those pool positions, in batches.

    Batches carry the pool positions as ``example_index``, so a cached teacher reads the right rows.
    """
    rows = []
    for start in range(0, len(positions), batch_size):
        chunk = positions[start : start + batch_size]
        batch = task.collate([pool[int(i)] for i in chunk])
        batch[INDEX_KEY] = torch.as_tensor(chunk, dtype=torch.long)
        rows.append(signal.outputs(batch, frozenset({"logits"})).logits.float().cpu())
    return torch.cat(rows)


def run_selection_rounds(
    task: Task,
    cfg: Selection,
    pool: Dataset,
    signal: TeacherSignal,
    train_round: Callable[[int, nn.Module | None, Dataset, TeacherSignal], nn.Module],
    evaluate: Callable[[nn.Module], dict[str, float]],
    batch_size: int,
) -> tuple[nn.Module, SelectionLog]:
    """Rounds of (choose points, query the teacher on them, train); returns the last model and the log.

    ``train_round(r, model, dataset, teacher)`` trains ``model`` (None: a fresh student) on the points
    bought so far and returns it.
    """
    rng = np.random.default_rng(selection_seed(task, cfg))
    log = SelectionLog(cfg.strategy, cfg.budget)
    bought: dict[int, torch.Tensor] = {}
    chosen = np.array([], dtype=np.int64)
    model: nn.Module | None = None
    for r, count in enumerate(cfg.per_round()):
        candidates = np.setdiff1d(np.arange(len(pool)), chosen, assume_unique=True)
        student_logits = None
        if model is not None and cfg.strategy != "random" and len(candidates):
            student_logits = task.evaluate(model, Subset(pool, candidates.tolist())).logits
        error = teacher_error_rate(torch.stack(list(bought.values()))) if bought else 0.0
        new = choose(cfg.strategy, candidates, count, rng, student_logits=student_logits, teacher_error=error)
        assert not np.isin(new, chosen).any(), "a point was chosen twice"
        for position, row in zip(new.tolist(), query_teacher(task, signal, pool, new, batch_size)):
            bought[position] = row
        log.queries += len(new)
        chosen = np.sort(np.concatenate([chosen, new]))
        model = train_round(r, model, Subset(pool, chosen.tolist()), QueriedTeacher(bought, chosen))
        record = {"round": r, "queried": len(new), "total": len(chosen), "teacher_error_estimate": error}
        record.update({f"eval_{k}": v for k, v in evaluate(model).items()})
        log.rounds.append(record)
        if len(chosen) == len(pool):
            break
    assert model is not None
    return model, log


def selection_seed(task: Task, cfg: Selection) -> int:
    return cfg.seed if cfg.seed is not None else task.recipe.training.seed


@register_method
class ActiveDistillation(Method):
    """Rounds of (choose points, buy the teacher's outputs on them, train), under a budget of queries."""

    name = "active_distillation"
    summary = "Buy the teacher's outputs point by point under a budget: random, margin or robust (RAD) choice"
    paper = Paper("Robust Active Distillation", 2023, "2210.01213")
    settings = Selection
    requires = frozenset({"gives_logits"})
    needs_teacher = True
    trains_student = True

    @classmethod
    def check(cls, cfg, recipe, where):
        from kdforge.objective import teacher_fields_of

        other = sorted(teacher_fields_of(recipe.objective) - {"logits"})
        if other:
            raise RecipeError(
                f"{where}: active distillation buys the teacher's logits per point; the objective also compares"
                f" the teacher's {', '.join(other)}; use logit losses (hinton_kd, dkd, ...) with it"
            )

    def train_student(self, run: StudentRun, resume: bool):
        done = run.rounds.finished(resume)
        if done is not None:
            return done
        if run.signal is None:
            raise RecipeError(
                f"{self.where}: active distillation chooses which points the teacher labels; add a teacher"
            )
        model, log = run_selection_rounds(
            self.task,
            self.cfg,
            run.splits.train,
            run.signal,
            lambda r, model, dataset, signal: run.rounds.train(model, dataset, signal),
            run.evaluate,
            self.task.recipe.evaluation.batch_size,
        )
        return model, run.rounds.save(model, selection={**log.as_dict(), "pool": len(run.splits.train)})

    def baseline_plan(self, pool: Dataset, student_train: dict[str, Any]) -> BaselinePlan:
        """As many random labelled points as teacher queries bought, as many optimizer steps as all rounds."""
        cfg: Selection = self.cfg  # type: ignore[assignment]
        count = student_train.get("selection", {}).get("teacher_queries", cfg.budget)
        rng = np.random.default_rng(selection_seed(self.task, cfg))
        chosen = np.sort(rng.choice(len(pool), size=min(count, len(pool)), replace=False)).tolist()
        return BaselinePlan(train_set=Subset(pool, chosen), steps=student_train["steps"])

    @classmethod
    def report_html(cls, report, render):
        return render(_SECTION)


_SECTION = """{% if train.selection %}{% set sel = train.selection %}
<h2>Active distillation (first seed)</h2>
<p>Strategy <b>{{ sel.strategy }}</b>: {{ sel.teacher_queries }} teacher queries of a budget of {{ sel.budget }}
 (pool of {{ sel.pool }} points, each queried at most once); the baseline trained on as many random labelled points, as many steps.</p>
<table><tr><th>round</th><th>queried</th><th>points so far</th><th>teacher error estimate</th>{% for k in sel.rounds[0] if k.startswith("eval_") %}<th>{{ k[5:] }} (evaluation split)</th>{% endfor %}</tr>
{% for r in sel.rounds %}<tr><td>{{ r.round }}</td><td>{{ r.queried }}</td><td>{{ r.total }}</td><td>{{ "%.3f" | format(r.teacher_error_estimate) }}</td>{% for k in r if k.startswith("eval_") %}<td>{{ "%.4f" | format(r[k]) }}</td>{% endfor %}</tr>
{% endfor %}</table>
{% endif %}"""  # noqa: E501 (HTML, kept as it renders)
