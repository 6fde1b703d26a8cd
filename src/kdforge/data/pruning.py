"""Data pruning before distillation: keep a fraction of the training set.

Ben-Baruch et al. (ICML 2025, "Distilling the Knowledge in Data Pruning") train the
student on a kept fraction f of the data with (1 - alpha) CE + alpha KD, the teacher
having seen all of it; the best alpha grows as f shrinks, and with KD random pruning
is as good as pruning by a score. Both are offered here: ``random`` and the
teacher's margin (top-1 minus top-2 probability), keeping the hardest or easiest.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field

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
