"""MI-alpha: a lower bound on the mutual information between teacher and student representations.

He et al. 2021, "Distiller: A Systematic Study of Model Distillation Methods in
Natural Language Processing" (arXiv 2109.11105, SustaiNLP) view intermediate-layer
distillation objectives as lower bounds on I(h_teacher; h_student) and found the
interpolated bound I_alpha of Poole et al. 2019 ("On Variational Bounds of Mutual
Information", ICML; their Eq. 12) the best of them. Distiller's code was not found,
so :class:`MIAlpha` is a re-implementation from Poole et al.'s formula; its estimator
is written out in full in the class docstring.

This is a loss module, not a loss function: its critic has learnable parameters. A
recipe term ``{loss: mi_alpha, field: hidden, params: {student_dim: ..., teacher_dim: ...}}``
builds one, and the engine trains the critic with the student.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from kdforge.losses.common import upcast
from kdforge.losses.registry import SizeMismatch, register_loss_module
from kdforge.provenance import Paper

__all__ = ["MIAlpha", "log_mean_exp_leave_one_out", "mi_alpha_bound"]


def log_mean_exp_leave_one_out(scores: torch.Tensor) -> torch.Tensor:
    """``out[i, j] = log( 1/(N-1) * sum_{k != j} exp(scores[i, k]) )`` for a ``[N, N]`` matrix, N >= 2.

    Computed without forming the N^3 masked copies and without cancellation: each
    row is shifted by its maximum, so the terms are at most 1 and the row's argmax
    term is exactly 1. Leaving out a column j other than the argmax leaves that 1 in
    the sum, so the subtraction ``total - term_j`` keeps a result >= 1 (relative error
    of order N * eps). Leaving out the argmax itself could cancel catastrophically,
    so that one entry per row is a log-sum-exp over the other columns.
    """
    n = scores.shape[-1]
    top, arg = scores.detach().max(dim=-1, keepdim=True)
    is_top = torch.arange(n, device=scores.device) == arg
    terms = torch.exp(scores - top)
    rest = terms.sum(dim=-1, keepdim=True) - terms
    # the argmax column's branch is replaced before the log, whose gradient at 0 would be NaN
    without_j = top + torch.log(torch.where(is_top, torch.ones_like(rest), rest))
    without_top = torch.logsumexp(scores.masked_fill(is_top, -math.inf), dim=-1, keepdim=True)
    return torch.where(is_top, without_top, without_j) - math.log(n - 1)


def _log_denominator(log_m: torch.Tensor, alpha: float) -> torch.Tensor:
    """log(alpha * m + (1 - alpha) * 1) from log m, in log space; exact at alpha = 0 and 1."""
    if alpha >= 1:
        return log_m
    if alpha <= 0:
        return torch.zeros_like(log_m)
    return torch.logaddexp(log_m + math.log(alpha), torch.full_like(log_m, math.log1p(-alpha)))


def mi_alpha_bound(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """Poole et al.'s interpolated bound I_alpha estimated from a ``[N, N]`` critic matrix (a scalar).

    ``scores[i, j] = f(t_j, s_i)``: row i is student sample i against every teacher
    sample j; the pairs (t_i, s_i) on the diagonal are draws from the joint, the
    off-diagonal pairs are the negatives. See :class:`MIAlpha` for the estimator.
    """
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"scores must be a square [N, N] matrix, got {tuple(scores.shape)}")
    n = scores.shape[0]
    if n < 2:
        raise ValueError(f"in-batch negatives need at least 2 samples, got {n}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=scores.device)
    loo = log_mean_exp_leave_one_out(scores)
    # positive term: the pair (t_i, s_i) against m over t_i and N-2 of the others, averaged
    # over which other sample j is left out
    positive = (scores.diagonal().unsqueeze(-1) - _log_denominator(loo, alpha))[off_diagonal].mean()
    # marginal term: s_i against t_j (j != i), m over the N-1 teacher samples other than t_i
    ratio = scores - _log_denominator(loo.diagonal(), alpha).unsqueeze(-1)
    marginal = torch.exp(torch.logsumexp(ratio[off_diagonal], dim=0) - math.log(n * (n - 1)))
    return 1 + positive - marginal


class _BilinearCritic(nn.Module):
    """f(t, s) = s^T W t + c; W starts at 0, so every score starts at c = 0."""

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(student_dim, teacher_dim))
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        dtype = student.dtype
        return student @ self.weight.to(dtype) @ teacher.T + self.bias.to(dtype)


class _SeparableMLPCritic(nn.Module):
    """f(t, s) = g(s) . h(t) + c with g, h one-hidden-layer ReLU MLPs to ``hidden`` dimensions.

    g's output layer starts at 0, so every score starts at c = 0.
    """

    def __init__(self, student_dim: int, teacher_dim: int, hidden: int) -> None:
        super().__init__()
        self.student_net = nn.Sequential(nn.Linear(student_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.teacher_net = nn.Sequential(nn.Linear(teacher_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        nn.init.zeros_(self.student_net[2].weight)
        nn.init.zeros_(self.student_net[2].bias)
        self.bias = nn.Parameter(torch.zeros(()))

    @staticmethod
    def _embed(net: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        first, _, last = net
        hidden = F.relu(F.linear(x, first.weight.to(x.dtype), first.bias.to(x.dtype)))
        return F.linear(hidden, last.weight.to(x.dtype), last.bias.to(x.dtype))

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return self._embed(self.student_net, student) @ self._embed(self.teacher_net, teacher).T + self.bias.to(
            student.dtype
        )


DISTILLER = Paper(
    "Distiller: A Systematic Study of Model Distillation Methods in Natural Language Processing",
    2021,
    "2109.11105",
    authors="He and others",
)


@register_loss_module("mi_alpha", couples_batch=True, paper=DISTILLER)
class MIAlpha(nn.Module):
    """Loss = -I_alpha, the interpolated MI lower bound between student and teacher representations.

    Paper: He et al. 2021 (Distiller, arXiv 2109.11105) use Poole et al. 2019's bound
    as their "MI-alpha" intermediate-layer objective. Distiller's code was not found;
    this is a re-implementation from Poole et al.'s formula (their Eq. 12), with the
    teacher as x and the student as y:

        I_alpha = 1 + E_{p(t_1, s) p(t_2..t_K)}[ log( e^{f(t_1,s)} / (alpha m(s) + (1 - alpha)) ) ]
                    - E_{p(t_1..t_K) p(s)}[ e^{f(t_1,s)} / (alpha m(s) + (1 - alpha)) ],
        m(s) = 1/K sum_{k=1..K} e^{f(t_k, s)},

    with the baseline b(s) = 1. alpha = 1 is InfoNCE (at most log K, low variance);
    alpha = 0 is NWJ with baseline 1, i.e. 1 + E_p[f] - E_{p(t)p(s)}[e^f], which is
    Nguyen-Wainwright-Jordan's E_p[f'] - e^{-1} E[e^{f'}] for the critic f' = f + 1
    (unbiased, high variance). It is a lower bound for every critic and alpha in [0, 1].

    In-batch estimate (N counted samples, K = N - 1). ``scores[i, j] = f(t_j, s_i)``:
    each student row against all teacher rows of the batch, positives on the diagonal.

    - Positive term: for each i, the pair (t_i, s_i); m(s_i) runs over K teacher rows
      that *include* t_i (the bound's x_1) and N - 2 of the others; it is averaged over
      the N - 1 choices of the left-out row j != i. So m averages K = N - 1 samples,
      not N: the marginal term has only N - 1 teacher rows independent of s_i, and
      both terms must use the same K for the bound to hold.
    - Marginal (negative) term: for each i and each j != i, the pair (t_j, s_i), with
      m(s_i) over the N - 1 teacher rows other than t_i (all independent of s_i, and
      including t_j); averaged over the N (N - 1) off-diagonal pairs. The positive
      t_i is excluded from this m; the diagonal never enters the marginal term.

    So at alpha = 1 the marginal term is exactly 1 and I_1 is the mean, over the N - 1
    ways of leaving one negative out, of the usual InfoNCE log K - CE(row i, label i)
    with K = N - 1 (hence I_1 <= log(N - 1)); at alpha = 0 it is the in-batch NWJ
    1 + mean_i f_ii - mean_{i != j} e^{f_ij}. Both terms are unbiased estimates of
    Poole et al.'s terms when the N pairs are independent draws.

    Stability: everything is in log space. The leave-one-out log m is computed from
    row-max-shifted exponentials (see :func:`log_mean_exp_leave_one_out`); the
    denominator log(alpha m + 1 - alpha) is a logaddexp; the marginal term is
    exp(logsumexp(...) - log(N (N - 1))). For alpha > 0 each marginal ratio is at most
    (N - 1) / alpha, so that term is bounded whatever the scores; at alpha = 0 (NWJ) it
    is not and e^f can overflow once the critic's scores grow, the known variance of NWJ.

    Critic (``critic``):

    - ``"bilinear"``: f(t, s) = s^T W t + c, W ``[student_dim, teacher_dim]``.
    - ``"mlp"``: Poole et al.'s separable critic f(t, s) = g(s) . h(t) + c, g and h
      Linear-ReLU-Linear MLPs to ``hidden`` dimensions; separable so the N x N score
      matrix is one matrix product instead of N^2 MLP evaluations.

    Both have a learned scalar bias c, which InfoNCE ignores and which otherwise acts
    as a learned constant baseline b = e^{-c}; with c = 0 the baseline is 1. W (and g's
    output layer) start at 0, so every score starts at 0 and I_alpha starts at 0.

    Args:
        student_dim, teacher_dim: the feature sizes Ds and Dt.
        alpha: in [0, 1] (default 0.5).
        critic: ``"bilinear"`` (default) or ``"mlp"``.
        hidden: width of the MLP critic (default 256; unused by the bilinear one).

    ``forward(student, teacher, *, mask=None)``:
        student: ``[B, Ds]`` or ``[B, L, Ds]``; teacher: ``[B, Dt]`` or ``[B, L, Dt]``
        with the same leading shape. mask: ``[B]`` or ``[B, L]`` booleans (the
        positions' shape), True = counted; default all. Counted positions of the whole
        batch are flattened into the N samples (N >= 2), so with ``[B, L, D]`` other
        positions of the same sequence serve as negatives too, although they are not
        independent of the positive: pool to ``[B, D]`` where that matters.
        Returns the scalar -I_alpha (so minimising it raises the bound). Gradients flow
        to the critic and to both inputs; pass a detached teacher as usual.

    Arithmetic is in float32 whatever the input dtype, autocast included (float64
    inputs or a float64 module compute in float64, for references and gradcheck).
    """

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        *,
        alpha: float = 0.5,
        critic: Literal["bilinear", "mlp"] = "bilinear",
        hidden: int = 256,
    ) -> None:
        super().__init__()
        for name, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] (1 = InfoNCE, 0 = NWJ), got {alpha}")
        self.student_dim, self.teacher_dim, self.alpha = student_dim, teacher_dim, float(alpha)
        if critic == "bilinear":
            self.critic: nn.Module = _BilinearCritic(student_dim, teacher_dim)
        elif critic == "mlp":
            self.critic = _SeparableMLPCritic(student_dim, teacher_dim, hidden)
        else:
            raise ValueError(f"critic must be 'bilinear' or 'mlp', got {critic!r}")

    def _samples(
        self, student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The counted positions as ``[N, Ds]`` and ``[N, Dt]`` rows in the compute dtype."""
        expected = f"student must be [B, {self.student_dim}] or [B, L, {self.student_dim}], got {tuple(student.shape)}"
        if student.ndim not in (2, 3):
            raise ValueError(expected)
        if student.shape[-1] != self.student_dim:
            raise SizeMismatch(
                expected, param="student_dim", expected=self.student_dim, actual=student.shape[-1], side="student"
            )
        expected = (
            f"teacher must be {(*student.shape[:-1], self.teacher_dim)} to match student {tuple(student.shape)},"
            f" got {tuple(teacher.shape)}; nothing is broadcast"
        )
        if teacher.shape[:-1] != student.shape[:-1]:
            raise ValueError(expected)
        if teacher.shape[-1] != self.teacher_dim:
            raise SizeMismatch(
                expected, param="teacher_dim", expected=self.teacher_dim, actual=teacher.shape[-1], side="teacher"
            )
        if mask is not None and mask.shape != student.shape[:-1]:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(student.shape[:-1])}")
        wide = any(x.dtype == torch.float64 for x in (student, teacher, *self.parameters()))
        dtype = torch.float64 if wide else torch.float32
        s = upcast(student).to(dtype).reshape(-1, self.student_dim)
        t = upcast(teacher).to(dtype).reshape(-1, self.teacher_dim)
        if mask is not None:
            keep = mask.reshape(-1).bool()
            s, t = s[keep], t[keep]
        if s.shape[0] < 2:
            raise ValueError(f"MI-alpha needs at least 2 counted positions for in-batch negatives, got {s.shape[0]}")
        return s, t

    def scores(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """The critic matrix ``[N, N]``, ``scores[i, j] = f(teacher[j], student[i])``, for rows ``[N, D]``."""
        return self.critic(student, teacher)

    def bound(self, student: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
        """I_alpha in nats (a scalar); inputs as :meth:`forward`."""
        with torch.autocast(device_type=student.device.type, enabled=False):
            s, t = self._samples(student, teacher, mask)
            return mi_alpha_bound(self.scores(s, t), self.alpha)

    def forward(
        self, student: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The loss -I_alpha (a scalar); see the class docstring for shapes."""
        return -self.bound(student, teacher, mask=mask)

    def extra_repr(self) -> str:
        return f"student_dim={self.student_dim}, teacher_dim={self.teacher_dim}, alpha={self.alpha}"
