"""Data pruning before distillation: keep a fraction of the training set.

Ben-Baruch et al. (ICML 2025, "Distilling the Knowledge in Data Pruning") train the
student on a kept fraction f of the data with (1 - alpha) CE + alpha KD, the teacher
having seen all of it; the best alpha grows as f shrinks, and with KD random pruning
is as good as pruning by a score. Both are offered here: ``random`` and the
teacher's margin (top-1 minus top-2 probability), keeping the hardest or easiest.

A recipe: ``methods: [{name: data_pruning, fraction: 0.3, by: random}]``; the objective
sets alpha, e.g. ``cross_entropy`` weighted 1 - alpha and ``hinton_kd`` weighted alpha.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

from kdforge.errors import RecipeError
from kdforge.methods.base import Method, register_method
from kdforge.provenance import Paper
from kdforge.recipe import Strict


class Pruning(Strict):
    """Which share of the training set the student (and the baseline) sees; the teacher saw all of it."""

    fraction: float = Field(..., gt=0, le=1, description="share of the training set kept, 0 < f <= 1")
    by: Literal["random", "teacher_margin"] = Field(
        "random", description="random, or by the teacher's margin (top-1 minus top-2 probability)"
    )
    keep: Literal["hard", "easy"] = Field(
        "hard", description="with by: teacher_margin, keep the smallest margins (hard) or the largest (easy)"
    )
    seed: int = Field(0, description="seed of the random choice (and of ties)")


def margins(logits: torch.Tensor) -> np.ndarray:
    """Top-1 minus top-2 probability per row of ``logits`` [N, C]: small = the model is unsure."""
    probs = torch.softmax(logits.float(), dim=-1)
    top = probs.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).numpy()


def kept_count(n: int, fraction: float) -> int:
    return max(1, round(n * fraction))


def keep_indices(n: int, cfg: Pruning, scores: np.ndarray | None = None) -> np.ndarray:
    """Sorted positions of the kept examples among ``n``; ``scores`` are margins when ``cfg.by`` needs them."""
    count = kept_count(n, cfg.fraction)
    rng = np.random.default_rng(cfg.seed)
    if cfg.by == "random":
        return np.sort(rng.choice(n, size=count, replace=False))
    if scores is None or len(scores) != n:
        raise ValueError(f"pruning by {cfg.by} needs one score per example ({n})")
    # a random tie-break first, then a stable sort: equal margins do not favour early examples
    order = rng.permutation(n)
    ranked = order[np.argsort(scores[order], kind="stable")]
    chosen = ranked[:count] if cfg.keep == "hard" else ranked[::-1][:count]
    return np.sort(chosen)


@register_method
class DataPruning(Method):
    """Student and baseline train on a kept fraction of the training set; the teacher saw all of it."""

    name = "data_pruning"
    summary = "Train student and baseline on a kept fraction of the data: random, or by the teacher's margin"
    paper = Paper("Distilling the Knowledge in Data Pruning", 2024, "2403.07854")
    settings = Pruning
    requires = frozenset({"gives_logits"})
    #: as in round 1, where a recipe's data held one plan: pruning under rounds of their own is not tested
    excludes = frozenset({"active_distillation", "pgkd"})

    def prepare_splits(self, splits, teacher_model):
        from torch.utils.data import Subset

        from kdforge.tasks.base import Splits

        cfg: Pruning = self.cfg  # type: ignore[assignment]
        total = len(splits.train)
        scores = None
        if cfg.by == "teacher_margin":
            if teacher_model is None:
                raise RecipeError(
                    f"{self.where}.by: teacher_margin scores the training set with the teacher, and this recipe has no"
                    " local teacher model; use by: random"
                )
            logits = self.task.evaluate(teacher_model, splits.train).logits
            if logits is None:
                raise RecipeError(f"{self.where}.by: the {self.task.name} task gives no logits to take margins of")
            scores = margins(logits)
        kept = keep_indices(total, cfg, scores)
        info = {"prune": {"fraction": cfg.fraction, "by": cfg.by, "keep": cfg.keep, "kept": len(kept), "of": total}}
        return Splits(Subset(splits.train, kept.tolist()), splits.eval, splits.test, splits.eval_name), info

    @classmethod
    def report_html(cls, report, render):
        return render(_SECTION)


_SECTION = """{% if report.data_plan and report.data_plan.prune %}{% set pr = report.data_plan.prune %}
<p>Data pruning: student and baseline trained on {{ pr.kept }} of {{ pr.of }} training examples
 (fraction {{ pr.fraction }}, {{ pr.by }}{% if pr.by != "random" %}, keeping the {{ pr.keep }} ones{% endif %}); the teacher saw all of them.</p>
{% endif %}"""  # noqa: E501 (HTML, kept as it renders)
