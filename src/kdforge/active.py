"""Active distillation and data pruning: which training points the student learns from.

Both are recipe settings of a classification task's data (``data.selection``,
``data.prune``) and both work on any task whose ``evaluate`` returns logits. The runner
calls :func:`prune_splits` before training, and :func:`run_selection_rounds` instead
of one training phase when the recipe selects: the student trains in rounds, and
after each round the strategy (:mod:`kdforge.data.selection`) picks the next points
whose teacher outputs are bought. Each point is queried once; its outputs are kept
and served back by :class:`QueriedTeacher` in later rounds, so the count of teacher
queries in the report is the number of distinct points the teacher has seen.
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
from kdforge.data.pruning import Pruning, keep_indices, margins
from kdforge.data.selection import Selection, choose, teacher_error_rate
from kdforge.errors import RecipeError
from kdforge.outputs import ModelOutputs
from kdforge.signals.base import Batch, TeacherSignal
from kdforge.tasks.base import Splits, Task


def data_plan(task: Task) -> tuple[Pruning | None, Selection | None]:
    return getattr(task.data_cfg, "prune", None), getattr(task.data_cfg, "selection", None)


def prune_splits(task: Task, splits: Splits, teacher_model: nn.Module | None) -> tuple[Splits, dict[str, Any]]:
    """``splits`` with the training set cut to ``data.prune.fraction`` (student and baseline both see it)."""
    cfg, _ = data_plan(task)
    if cfg is None:
        return splits, {}
    total = len(splits.train)
    scores = None
    if cfg.by == "teacher_margin":
        if teacher_model is None:
            raise RecipeError(
                "data.prune.by: teacher_margin scores the training set with the teacher, and this recipe has no"
                " local teacher model; use by: random"
            )
        logits = task.evaluate(teacher_model, splits.train).logits
        if logits is None:
            raise RecipeError(f"data.prune.by: the {task.name} task gives no logits to take margins of; use random")
        scores = margins(logits)
    kept = keep_indices(total, cfg, scores)
    info = {"prune": {"fraction": cfg.fraction, "by": cfg.by, "keep": cfg.keep, "kept": len(kept), "of": total}}
    pruned = Splits(Subset(splits.train, kept.tolist()), splits.eval, splits.test, splits.eval_name)
    return pruned, info


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


def check_objective(teacher_fields: frozenset[str]) -> None:
    other = sorted(teacher_fields - {"logits"})
    if other:
        raise RecipeError(
            f"data.selection: active distillation buys the teacher's logits per point; the objective also compares"
            f" the teacher's {', '.join(other)}; use logit losses (hinton_kd, dkd, ...) with data.selection"
        )


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


def selection_baseline_set(
    task: Task, pool: Dataset, student_train: dict[str, Any], cfg: Selection | None
) -> Dataset | None:
    """The labels-only baseline of an active run: as many random labelled points as teacher queries bought."""
    if cfg is None:
        return None
    count = student_train.get("selection", {}).get("teacher_queries", cfg.budget)
    rng = np.random.default_rng(selection_seed(task, cfg))
    return Subset(pool, np.sort(rng.choice(len(pool), size=min(count, len(pool)), replace=False)).tolist())
