"""TAID: distillation towards a target that moves from the student to the teacher.

Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for Efficient
Knowledge Transfer in Language Models", ICLR 2025 (arXiv 2501.16937). The loss is a
pure function of the interpolation coefficient ``t``; :class:`TAIDSchedule` is the
term state that moves ``t`` from ``t_start`` to ``t_end`` during training, faster
while the loss keeps falling.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F

from kdforge.losses.chunking import FusedKernel, check_pair, fused_per_position
from kdforge.losses.common import kl_per_position, masked_mean, mean_of_sum
from kdforge.losses.linear import HeadLogits, kernel_chunk, linear_or_dense, position_count, weighted_sum
from kdforge.losses.registry import register_loss
from kdforge.provenance import Paper

TAID = Paper(
    "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge Transfer in Language Models",
    2025,
    "2501.16937",
    authors="Shing and others",
)


def _sigmoid(x: float) -> float:
    # written for both signs so that a huge |momentum| never overflows math.exp
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    z = math.exp(x)
    return z / (1.0 + z)


def _integer(value: Any, name: str) -> int:
    """``value`` as an int if it is an integer of any kind (numpy's too), else ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


class TAIDSchedule:
    """TAID's interpolation coefficient ``t``: linear from ``t_start`` to ``t_end``, pushed up adaptively.

    After each optimizer step ``n`` (``update`` receives that step's mean loss J_n):

    - the first call only stores J as J_prev;
    - delta_n = (J_prev - J_n) / (J_prev + 1e-15); m_n = beta * m_{n-1} + (1 - beta) * delta_n, m_0 = 0;
    - t <- min(t_end, max(t_lin(n), t + alpha * sigmoid(m_n) * (1 - t))),

    where t_lin(n) = t_start + (t_end - t_start) * min(n / total_steps, 1) and n counts the
    optimizer steps done so far. So ``t`` never decreases, never falls below the linear
    schedule, and equals ``t_end`` once ``total_steps`` steps are done. With
    ``adaptive=False``, ``t = t_lin(n)``.

    Defaults are the paper's (SakanaAI/TAID ``src/arguments.py``): t_start 0.4, t_end 1.0,
    alpha 5e-4, beta 0.99; the authors use t_start 0.2 for some teacher/student pairs.

    Differences from the authors' code, chosen here:

    - The floor after n completed steps is t_lin(n), so ``t`` reaches ``t_end`` exactly when
      ``total_steps`` steps are done. (Their floor reads Lightning's ``global_step``; whether
      that counts the step being finished is not checked here: at most one step,
      (t_end - t_start) / total_steps, apart.)
    - The first call applies the linear floor too (it only skips the momentum).
    - A non-finite loss leaves J_prev and the momentum unchanged (the step still counts
      for the linear floor): a NaN momentum would switch the adaptive push off for good.
    - J is whatever the objective reports for the term: with the ``taid`` loss that is
      KL(p_t || q), whereas the authors feed their cross-entropy H(p_t, q) = KL + H(p_t).
      The KL has no H(p_t) offset, so its relative changes delta are larger.

    Args:
        total_steps: optimizer steps in the run (>= 1).
        t_start, t_end: 0 <= t_start <= t_end <= 1.
        alpha: step size of the adaptive push, in [0, 1].
        beta: momentum of the relative loss change, in [0, 1).
        adaptive: False for the plain linear schedule (the authors' ``disable_adaptive``).
    """

    provides = ("t",)

    def __init__(
        self,
        total_steps: int,
        *,
        t_start: float = 0.4,
        t_end: float = 1.0,
        alpha: float = 5e-4,
        beta: float = 0.99,
        adaptive: bool = True,
    ):
        total_steps = _integer(total_steps, "total_steps")
        if total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        if not 0.0 <= t_start <= t_end <= 1.0:
            raise ValueError(f"need 0 <= t_start <= t_end <= 1, got t_start={t_start}, t_end={t_end}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        if not isinstance(adaptive, bool):
            raise ValueError(f"adaptive must be true or false, got {adaptive!r}")
        self.total_steps = total_steps
        self.t_start = float(t_start)
        self.t_end = float(t_end)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.adaptive = adaptive
        self.t = self.t_start
        self.steps_done = 0
        self.prev_loss: float | None = None
        self.momentum = 0.0

    def linear(self, steps_done: int) -> float:
        """The linear schedule's ``t`` after ``steps_done`` optimizer steps."""
        progress = min(steps_done / self.total_steps, 1.0)
        # min(): t_start + (t_end - t_start) * 1 can round above t_end
        return min(self.t_end, self.t_start + (self.t_end - self.t_start) * progress)

    def loss_params(self) -> dict[str, Any]:
        return {"t": self.t}

    def update(self, loss_value: float) -> None:
        """Take one optimizer step's mean loss and set ``t`` for the next step."""
        self.steps_done += 1
        floor = self.linear(self.steps_done)
        if not self.adaptive:
            self.t = floor
            return
        loss_value = float(loss_value)
        candidate = self.t
        if math.isfinite(loss_value):
            if self.prev_loss is not None:
                delta = (self.prev_loss - loss_value) / (self.prev_loss + 1e-15)
                self.momentum = self.beta * self.momentum + (1.0 - self.beta) * delta
                candidate = self.t + self.alpha * _sigmoid(self.momentum) * (1.0 - self.t)
            self.prev_loss = loss_value
        self.t = min(self.t_end, max(floor, candidate))

    def state_dict(self) -> dict[str, Any]:
        return {
            "t": self.t,
            "steps_done": self.steps_done,
            "prev_loss": self.prev_loss,
            "momentum": self.momentum,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.t = float(state["t"])
        self.steps_done = int(state["steps_done"])
        self.prev_loss = None if state["prev_loss"] is None else float(state["prev_loss"])
        self.momentum = float(state["momentum"])


@register_loss("taid", state=TAIDSchedule, paper=TAID, linear=True)
def taid(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    t: float,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """TAID: KL(p_t || q_student) towards a target interpolated from the student to the teacher by t.

    The target is p_t = softmax((1 - t) * sg(z_student) + t * z_teacher): interpolated in
    logit space, with the student's logits detached, at temperature 1 (no T^2). So t = 0
    gives 0 and t = 1 gives :func:`~kdforge.losses.logits.forward_kl` at T = 1. In a recipe,
    ``t`` comes from the term's :class:`TAIDSchedule` (params ``t_start``, ``t_end``,
    ``alpha``, ``beta``, ``adaptive``), never from the recipe itself. Shing et al., ICLR 2025,
    "TAID: Temporally Adaptive Interpolated Distillation" (arXiv 2501.16937).

    The authors' code minimises the cross-entropy H(p_t, q): the same gradient, but its
    value also holds H(p_t). This returns the KL, which is 0 when the student matches
    the target.

    Args:
        student: logits ``[B, C]`` or ``[B, L, V]`` (gradients flow here only through q).
        teacher: logits of the same shape, or a top-k teacher ``(ids, log_probs)``: the
            interpolation then runs over the k + 1 buckets of :mod:`kdforge.losses.logits`
            (the teacher's tokens and one tail bucket).
        t: interpolation coefficient, 0 <= t <= 1.
        mask: ``[B]`` or ``[B, L]`` booleans, True = counted; default all.

    Returns:
        Scalar: per-position KL summed over the last axis, averaged over counted positions
        of the whole batch; float32 (float64 for float64 inputs). ``-inf`` logits (a masked
        vocabulary) give probability 0 and no NaN. Large inputs go through the chunked,
        fused path of :mod:`kdforge.losses.chunking` (gradient in closed form: q - p_t).
    """
    t = float(t)
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    student, teacher = linear_or_dense(student, teacher)
    check_pair(student, teacher)
    if isinstance(student, HeadLogits):
        total = weighted_sum(kernel_chunk(taid_kernel(t), 1.0), student, teacher, mask)
        return mean_of_sum(total, position_count(student, mask))
    return masked_mean(fused_per_position(student, teacher, taid_kernel(t), 1.0), mask)


def taid_kernel(t: float) -> FusedKernel:
    # A log-softmax differs from its logits by one constant per position, which the
    # softmax of the mixture cancels: mixing log-softmaxes is mixing logits. At t = 0 or 1
    # the target is one side as it is, not 0 * (-inf) = NaN plus the other side.
    def formula(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        if t in (0.0, 1.0):
            log_target = log_p if t == 1.0 else log_q.detach()
        else:
            log_target = F.log_softmax((1.0 - t) * log_q.detach() + t * log_p, dim=-1)
        return kl_per_position(log_target, log_q)

    def fused(log_q, log_p, out, tmp):
        if t in (0.0, 1.0):
            out.copy_(log_p if t == 1.0 else log_q)
        else:
            torch.mul(log_q, 1.0 - t, out=tmp).add_(log_p, alpha=t)
            torch.log_softmax(tmp, -1, out=out)
        value = torch.sub(out, log_q, out=tmp).mul_(out.exp_()).masked_fill_(out == 0, 0.0).sum(-1)
        out.neg_()  # q * dKL(r || q)/dq = -r, the target being constant
        return value

    return FusedKernel(fused, formula)
