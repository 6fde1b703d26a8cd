"""Which training points to ask the teacher about, under a budget of teacher queries.

Active distillation: the pool is large, the teacher's soft labels are costly, so the
student is trained in rounds and after each round picks the next points to query.

- ``random``: uniformly among the points not queried yet.
- ``margin``: the points where the student's top-2 probabilities are closest
  (uncertainty sampling by margin).
- ``rad``: robust active distillation (Baykal et al., ICLR 2023). Informative points
  (small student margin, gain g = 1 - margin) are also the ones a teacher gets wrong
  most often, and a wrong soft label hurts. The paper's game: the learner picks
  inclusion probabilities p (sum = budget b, each <= 1); an adversary marks up to k
  picked points as wrongly labelled; the learner maximises the worst case of
  sum_i p_i g_i (1 - c_i). The adversary removes the k largest terms p_i g_i, so the
  learner's best answer equalises p_i g_i = c over a top-gain set S of size m:
  p_i = c / g_i, c = b / sum_S 1/g_i, worth (m - k) c; m is chosen to maximise it
  (with every p_i <= 1). k is the teacher's expected number of mistakes among the b
  queries, estimated from its own confidence on the points queried so far: k = b *
  mean(1 - max_c p_teacher) (a calibrated teacher's expected error rate). So the
  method needs no parameter. Our reading of the paper, whose authors' code is not
  public; the points are then drawn with exactly these inclusion probabilities
  (systematic sampling), b of them, no point twice.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import Field, model_validator

from kdforge.methods.data_pruning import margins
from kdforge.recipe import Strict

Strategy = Literal["random", "margin", "rad"]


class Selection(Strict):
    """Active distillation: rounds of training, each followed by teacher queries on chosen points."""

    strategy: Strategy = Field(..., description="random, margin (student uncertainty) or rad (robust active)")
    budget: int = Field(..., ge=1, description="teacher queries in all (distinct training points)")
    rounds: int = Field(4, ge=1, description="rounds of selection; training runs after each")
    initial: int | None = Field(
        None, ge=1, description="points queried at random before the first round (default: budget / rounds)"
    )
    seed: int | None = Field(
        None, description="seed of the random choices (default: the run's training.seed, so --seeds varies them)"
    )

    @model_validator(mode="after")
    def _fits(self) -> Selection:
        if self.initial is not None and self.initial > self.budget:
            raise ValueError(f"initial ({self.initial}) cannot exceed budget ({self.budget})")
        return self

    def per_round(self) -> list[int]:
        """Queries per round: the initial random set, then the rest spread evenly over the rounds."""
        first = self.initial if self.initial is not None else max(1, self.budget // self.rounds)
        rest = self.budget - first
        later = self.rounds - 1
        if later == 0:
            return [self.budget]
        return [first] + [rest // later + (1 if i < rest % later else 0) for i in range(later)]


def student_gains(student_logits: torch.Tensor) -> np.ndarray:
    """Informativeness of each point: 1 - the student's margin, in [0, 1]."""
    return 1.0 - margins(student_logits)


def teacher_error_rate(teacher_logits: torch.Tensor) -> float:
    """A calibrated teacher's expected error rate on its queried points: mean(1 - max probability)."""
    probs = torch.softmax(teacher_logits.float(), dim=-1)
    return float((1.0 - probs.max(dim=-1).values).mean())


def rad_probabilities(gains: np.ndarray, budget: int, mistakes: float) -> np.ndarray:
    """Inclusion probabilities (sum ``budget``, each in [0, 1]) of the robust-active-distillation game.

    Among top-gain sets of size m >= budget with c = budget / sum(1/g) <= the set's smallest
    gain (so that every p = c/g <= 1), the one maximising (m - mistakes) * c.
    """
    n = len(gains)
    if budget >= n:
        return np.ones(n)
    g = np.maximum(np.asarray(gains, dtype=np.float64), 1e-6)  # a zero gain would ask for p = inf
    order = np.argsort(-g, kind="stable")
    sorted_g = g[order]
    inverse_sums = np.cumsum(1.0 / sorted_g)
    sizes = np.arange(1, n + 1)
    c = budget / inverse_sums
    feasible = (sizes >= budget) & (c <= sorted_g + 1e-12)
    value = np.where(feasible, (sizes - mistakes) * c, -np.inf)
    p = np.zeros(n)
    if np.isfinite(value).any():
        best = int(np.argmax(value))
        p[order[: best + 1]] = np.minimum(c[best] / sorted_g[: best + 1], 1.0)
        return p
    # gains so uneven that no set keeps every p below 1: water-fill p = min(c/g, 1) over all points
    low, high = 0.0, float(sorted_g.max())
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if np.minimum(mid / g, 1.0).sum() < budget else (low, mid)
    return np.minimum(high / g, 1.0)


def systematic_sample(probabilities: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Exactly round(sum p) distinct indices, index i included with probability p_i (Madow's method)."""
    cumulative = np.concatenate([[0.0], np.cumsum(probabilities)])
    count = int(round(cumulative[-1]))
    points = rng.uniform() + np.arange(count)
    # item i covers [cum_i, cum_{i+1}); p_i <= 1, so no item covers two of the unit-spaced points
    chosen = np.searchsorted(cumulative, points, side="right") - 1
    return np.unique(np.clip(chosen, 0, len(probabilities) - 1))


def choose(
    strategy: Strategy,
    candidates: np.ndarray,
    count: int,
    rng: np.random.Generator,
    *,
    student_logits: torch.Tensor | None = None,
    teacher_error: float = 0.0,
) -> np.ndarray:
    """``count`` of ``candidates`` (positions in the pool not queried yet) to query next.

    ``student_logits`` are the student's logits on the candidates, in their order (not needed by random).
    """
    count = min(count, len(candidates))
    if count == 0:
        return candidates[:0]
    if strategy == "random" or student_logits is None:
        return np.sort(rng.choice(candidates, size=count, replace=False))
    gains = student_gains(student_logits)
    if strategy == "margin":
        tie_break = rng.permutation(len(candidates))
        ranked = tie_break[np.argsort(-gains[tie_break], kind="stable")]
        return np.sort(candidates[ranked[:count]])
    p = rad_probabilities(gains, count, teacher_error * count)
    picked = systematic_sample(p, rng)
    if len(picked) < count:  # rounding at the edges of float sums: fill up with the next-best gains
        rest = np.setdiff1d(np.argsort(-gains, kind="stable"), picked, assume_unique=True)
        picked = np.concatenate([picked, rest[: count - len(picked)]])
    return np.sort(candidates[picked[:count]])
