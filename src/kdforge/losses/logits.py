"""Divergences between student and teacher logits, and the label cross-entropy.

Shapes: logits are ``[B, C]`` (classification) or ``[B, L, V]`` (sequences);
``mask`` is ``[B]`` or ``[B, L]`` booleans, True where a position counts. Each
divergence sums over the last axis per position, then averages over the counted
positions of the whole batch (not a mean of per-sequence means). Arithmetic is in
float32 whatever the input dtype (float64 inputs stay float64, for references),
and ``-inf`` logits (a masked vocabulary) never produce NaN.

Top-k teachers: wherever a divergence takes ``teacher`` logits it also takes
``(topk_ids, topk_logprobs)`` (both ``[..., k]``), as a cache stores them. Both sides
are then compared over k + 1 buckets: the teacher's k tokens, and a tail bucket
holding the teacher's residual mass 1 - sum(top-k) against the student's mass
outside those tokens. The stored log-probs are taken as already at the run's
temperature; only the student's logits are divided by it (``dkd`` needs dense logits).

Large vocabularies: positions are processed in chunks of about ``CHUNK_ELEMENTS``
logits, so that the float32 copies, softmaxes and their gradients exist for one
chunk at a time instead of for the whole ``[B, L, V]`` tensor; the backward pass
recomputes each chunk's forward and writes the student's gradient into one buffer.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kdforge.losses.common import check_temperature, kl_per_position, masked_mean, upcast
from kdforge.losses.registry import register_loss

#: logits per chunk (16 MiB in float32: lower peaks than 64 MiB at no cost in time, see
#: benchmarks/README.md); inputs up to this size are not chunked
CHUNK_ELEMENTS = 1 << 22

#: ``(log_q_student, log_p_teacher) -> per-position value`` over the last axis
PositionFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: dense teacher logits, or a top-k teacher ``(topk_ids, topk_logprobs)``
Teacher = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def require_dense_teacher(teacher: Teacher, loss: str, reason: str) -> None:
    """Refuse a top-k teacher in a loss that needs every logit, saying why."""
    if isinstance(teacher, tuple):
        raise ValueError(f"{loss} needs the teacher's dense logits: {reason}, which a top-k teacher cannot give")


def _check_pair(student: torch.Tensor, teacher: Teacher) -> None:
    if isinstance(teacher, tuple):
        ids, log_probs = teacher
        if ids.shape != log_probs.shape or ids.shape[:-1] != student.shape[:-1] or ids.shape[-1] > student.shape[-1]:
            raise ValueError(
                "a top-k teacher needs ids and log-probs of the same shape [..., k] with the student's positions"
                f" and k <= vocabulary; got ids {tuple(ids.shape)}, log-probs {tuple(log_probs.shape)},"
                f" student {tuple(student.shape)}"
            )
        return
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ;"
            " nothing is broadcast"
        )


def _topk_buckets(
    log_q: torch.Tensor, ids: torch.Tensor, log_p_topk: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and teacher as distributions over k + 1 buckets: the teacher's top-k tokens and the rest.

    The teacher's tail bucket holds its residual mass 1 - sum(top-k) (clamped at 0,
    since stored log-probs are rounded); the student's holds all its mass outside
    those k tokens. Every divergence is then the same formula on the buckets.
    """
    log_q_topk = log_q.gather(-1, ids)
    if ids.shape[-1] >= log_q.shape[-1]:
        return log_q_topk, log_p_topk
    log_q_tail = torch.logsumexp(log_q.scatter(-1, ids, -math.inf), dim=-1, keepdim=True)
    log_p_tail = torch.log((1 - log_p_topk.exp().sum(-1, keepdim=True)).clamp_min(0))
    return torch.cat([log_q_topk, log_q_tail], -1), torch.cat([log_p_topk, log_p_tail], -1)


def _per_position(student: torch.Tensor, teacher: Teacher, fn: PositionFn, temperature: float) -> torch.Tensor:
    """``fn`` of the log-softmaxes at ``temperature``, per position, chunk by chunk.

    A top-k teacher's log-probs are taken as already at ``temperature`` (a cache is
    written at the run's temperature); only the student's logits are divided by it.
    """

    def run(s: torch.Tensor, *t: torch.Tensor) -> torch.Tensor:
        log_q = F.log_softmax(upcast(s) / temperature, dim=-1)
        if len(t) == 2:
            return fn(*_topk_buckets(log_q, t[0], upcast(t[1])))
        return fn(log_q, F.log_softmax(upcast(t[0]) / temperature, dim=-1))

    vocab = student.shape[-1]
    positions = student.shape[:-1]
    flat_s = student.reshape(-1, vocab)
    flat_t = [x.reshape(-1, x.shape[-1]) for x in (teacher if isinstance(teacher, tuple) else (teacher,))]
    rows = max(1, CHUNK_ELEMENTS // vocab)
    if flat_s.shape[0] <= rows:
        return run(flat_s, *flat_t).reshape(positions)
    if not (torch.is_grad_enabled() and any(x.requires_grad for x in (flat_s, *flat_t))):
        return _chunks(run, rows, flat_s, *flat_t).reshape(positions)
    if any(x.requires_grad for x in flat_t):  # a teacher with gradients: rare, keep it simple
        pieces = [checkpoint(run, *chunk, use_reentrant=False) for chunk in _slices(rows, flat_s, *flat_t)]
        return torch.cat(pieces).reshape(positions)
    return _ChunkedStudent.apply(run, rows, flat_s, *flat_t).reshape(positions)


def _slices(rows: int, *tensors: torch.Tensor):
    for start in range(0, tensors[0].shape[0], rows):
        yield [x[start : start + rows] for x in tensors]


def _chunks(run: Callable[..., torch.Tensor], rows: int, *tensors: torch.Tensor) -> torch.Tensor:
    return torch.cat([run(*chunk) for chunk in _slices(rows, *tensors)])


class _ChunkedStudent(torch.autograd.Function):
    """Per-position values chunk by chunk, with the student's gradient written in place.

    Autograd through slices would materialise a full-size gradient per chunk before
    summing them; here the backward pass recomputes one chunk at a time and writes
    its gradient into a single buffer, so the extra memory is that buffer plus one
    chunk's intermediates. The teacher gets no gradient.
    """

    @staticmethod
    def forward(ctx, run, rows, student, *teacher):  # noqa: ANN001
        ctx.run, ctx.rows = run, rows
        ctx.save_for_backward(student, *teacher)
        with torch.no_grad():
            return _chunks(run, rows, student, *teacher)

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001
        student, *teacher = ctx.saved_tensors
        grad = torch.empty_like(student)
        start = 0
        for chunk in _slices(ctx.rows, student, *teacher):
            piece = chunk[0].detach().requires_grad_(True)
            end = start + piece.shape[0]
            with torch.enable_grad():
                (grad[start:end],) = torch.autograd.grad(ctx.run(piece, *chunk[1:]), piece, grad_out[start:end])
            start = end
        return None, None, grad, *([None] * len(teacher))


def _divergence(
    student: torch.Tensor,
    teacher: Teacher,
    fn: PositionFn,
    *,
    temperature: float,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """The shared reduction: per-position ``fn``, masked mean over positions, times T^2."""
    check_temperature(temperature)
    _check_pair(student, teacher)
    return masked_mean(_per_position(student, teacher, fn, temperature), mask) * temperature**2


def _log_mixture(log_a: torch.Tensor, log_b: torch.Tensor, weight_a: float) -> torch.Tensor:
    """log(w*a + (1-w)*b) from log a and log b, stable in log space; w in [0, 1]."""
    if weight_a <= 0:
        return log_b
    if weight_a >= 1:
        return log_a
    # where both sides are -inf (a masked vocabulary entry) logaddexp's gradient is NaN;
    # those entries are set aside and come back as -inf with no gradient
    both = torch.isneginf(log_a) & torch.isneginf(log_b)
    log_a, log_b = log_a.masked_fill(both, 0.0), log_b.masked_fill(both, 0.0)
    mixed = torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))
    return mixed.masked_fill(both, -math.inf)


@register_loss("forward_kl")
def forward_kl(
    student: torch.Tensor,
    teacher: Teacher,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Forward KL(p_teacher || q_student) at temperature T, times T^2 (applied once).

    Both logit tensors are divided by ``temperature`` before the softmax; the T^2
    factor keeps gradient magnitudes comparable across temperatures (Hinton et al.
    2015, "Distilling the Knowledge in a Neural Network"). Mean-seeking: the student
    covers every mode of the teacher.

    Args:
        student: logits ``[B, C]`` or ``[B, L, V]`` (gradients flow here).
        teacher: logits of the same shape.
        temperature: T > 0.
        mask: ``[B]`` or ``[B, L]`` booleans, True = counted; default all.

    Returns:
        Scalar: per-position KL summed over classes, averaged over counted positions.
    """
    return _divergence(student, teacher, lambda lq, lp: kl_per_position(lp, lq), temperature=temperature, mask=mask)


@register_loss("hinton_kd")
def hinton_kd(
    student: torch.Tensor,
    teacher: Teacher,
    *,
    temperature: float = 4.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Hinton's soft-target loss: T^2 * KL(p_teacher || q_student) at temperature T (default 4).

    The same quantity as :func:`forward_kl`, with the temperature default of the
    KD literature (mdistiller, RepDistiller: T = 4). Mix it with ``cross_entropy``
    on labels in the objective (typically weights 0.9 and 0.1).

    Args / returns: as :func:`forward_kl`.
    """
    return forward_kl(student, teacher, temperature=temperature, mask=mask)


@register_loss("reverse_kl")
def reverse_kl(
    student: torch.Tensor,
    teacher: Teacher,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reverse KL(q_student || p_teacher) at temperature T, times T^2.

    Mode-seeking: the student puts its mass where the teacher is confident and may
    ignore minor modes (token-level form of MiniLLM's objective, Gu et al. 2024).
    Shapes, mask and reduction as :func:`forward_kl`.
    """
    return _divergence(student, teacher, lambda lq, lp: kl_per_position(lq, lp), temperature=temperature, mask=mask)


@register_loss("generalized_jsd")
def generalized_jsd(
    student: torch.Tensor,
    teacher: Teacher,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence of GKD: beta*KL(p||M) + (1-beta)*KL(q||M), times T^2.

    M = beta*p_teacher + (1-beta)*q_student, computed in log space (Agarwal et al.
    2024, "On-Policy Distillation of Language Models"; the convention of TRL's
    GKD trainer). It interpolates between forward-KL-like (small beta) and
    reverse-KL-like (large beta) behaviour, but JSD_beta -> 0 as beta -> 0 (it is
    about beta*KL(p||q)), so the end points are not the KLs themselves: use
    :func:`forward_kl` or :func:`reverse_kl` for those.

    Args:
        beta: 0 < beta < 1.
        Others as :func:`forward_kl`.
    """
    if not 0 < beta < 1:
        raise ValueError(
            f"beta must be strictly between 0 and 1, got {beta}; for beta = 0 use forward_kl, for beta = 1 reverse_kl"
        )

    def jsd(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        log_m = _log_mixture(log_p, log_q, beta)
        return beta * kl_per_position(log_p, log_m) + (1 - beta) * kl_per_position(log_q, log_m)

    return _divergence(student, teacher, jsd, temperature=temperature, mask=mask)


def _check_alpha(alpha: float) -> None:
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")


@register_loss("skew_kl")
def skew_kl(
    student: torch.Tensor,
    teacher: Teacher,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Skew KL of DistiLLM: KL(p_teacher || alpha*p_teacher + (1-alpha)*q_student), times T^2.

    Mixing some teacher into the student's side keeps the divergence finite and its
    gradients bounded where the student gives a token almost no mass (Ko et al.
    2024, "DistiLLM"). alpha = 0 is the forward KL. DistiLLM's code drops the
    constant H(p); this is the true KL (same gradient). Shapes as :func:`forward_kl`.
    """
    _check_alpha(alpha)
    return _divergence(
        student,
        teacher,
        lambda lq, lp: kl_per_position(lp, _log_mixture(lp, lq, alpha)),
        temperature=temperature,
        mask=mask,
    )


@register_loss("skew_reverse_kl")
def skew_reverse_kl(
    student: torch.Tensor,
    teacher: Teacher,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Skew reverse KL of DistiLLM: KL(q_student || (1-alpha)*p_teacher + alpha*q_student), times T^2.

    alpha = 0 is the reverse KL (Ko et al. 2024). Shapes as :func:`forward_kl`.
    """
    _check_alpha(alpha)
    return _divergence(
        student,
        teacher,
        lambda lq, lp: kl_per_position(lq, _log_mixture(lq, lp, alpha)),
        temperature=temperature,
        mask=mask,
    )


@register_loss("total_variation")
def total_variation(
    student: torch.Tensor,
    teacher: Teacher,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Total variation distance 0.5 * sum |p_teacher - q_student|, times T^2.

    Bounded in [0, 1] per position (before T^2); its gradient does not vanish
    where the student is confidently wrong. Shapes as :func:`forward_kl`.
    """
    return _divergence(
        student,
        teacher,
        lambda lq, lp: 0.5 * (lp.exp() - lq.exp()).abs().sum(-1),
        temperature=temperature,
        mask=mask,
    )


@register_loss("dkd", needs_labels=True)
def dkd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Decoupled KD: alpha*TCKD + beta*NCKD, each times T^2 (Zhao et al. 2022, mdistiller's convention).

    KL(p||q) = TCKD + (1 - p_gt) * NCKD, where TCKD is the KL between the binary
    distributions [p_gt, 1 - p_gt] of teacher and student, and NCKD the KL between
    their distributions renormalised over the non-target classes. DKD weighs the two
    separately, removing the (1 - p_gt) coupling that suppresses NCKD when the
    teacher is confident.

    Args:
        student, teacher: logits ``[B, C]`` or ``[B, L, V]``.
        labels: ``[B]`` or ``[B, L]`` target classes; ``ignore_index`` does not count.
        alpha, beta: weights of TCKD and NCKD (CIFAR-100 defaults 1 and 8).
        temperature: T (default 4).
        mask: optional extra ``[B]`` / ``[B, L]`` booleans, True = counted.

    Returns:
        Scalar: mean over counted positions of (alpha*TCKD + beta*NCKD) * T^2.
    """
    check_temperature(temperature)
    require_dense_teacher(teacher, "dkd", "it splits the teacher's distribution at the target class")
    _check_pair(student, teacher)
    if student.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(student.shape)} do not fit labels {tuple(labels.shape)}")
    counted = labels != ignore_index
    if mask is not None:
        counted = counted & mask.bool()
    target = torch.where(counted, labels, torch.zeros_like(labels)).unsqueeze(-1)
    gt = torch.zeros_like(student, dtype=torch.bool).scatter_(-1, target, True)

    def split(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log of the binary [p_gt, 1 - p_gt] ([..., 2]) and log of the non-target distribution."""
        scaled = upcast(logits) / temperature
        log_all = F.log_softmax(scaled, dim=-1)
        log_gt = log_all.gather(-1, target)
        log_rest = torch.logsumexp(log_all.masked_fill(gt, -math.inf), dim=-1, keepdim=True)
        log_non_target = F.log_softmax(scaled.masked_fill(gt, -math.inf), dim=-1)
        return torch.cat([log_gt, log_rest], dim=-1), log_non_target

    log_b_s, log_nt_s = split(student)
    log_b_t, log_nt_t = split(teacher)
    tckd = kl_per_position(log_b_t, log_b_s)
    nckd = kl_per_position(log_nt_t, log_nt_s)
    return masked_mean(alpha * tckd + beta * nckd, counted) * temperature**2


@register_loss("cross_entropy", target="labels")
def cross_entropy(
    student: torch.Tensor,
    labels: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Cross-entropy of student logits against integer labels (the hard target, T = 1).

    Args:
        student: logits ``[B, C]`` or ``[B, L, V]``.
        labels: ``[B]`` or ``[B, L]`` class ids; ``ignore_index`` positions do not count.
        mask: optional extra ``[B]`` / ``[B, L]`` booleans, True = counted.

    Returns:
        Scalar: mean negative log-likelihood over counted positions of the whole batch.
    """
    if student.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(student.shape)} do not fit labels {tuple(labels.shape)}")
    counted = labels != ignore_index
    if mask is not None:
        counted = counted & mask.bool()
    safe_labels = torch.where(counted, labels, torch.zeros_like(labels))
    log_q = F.log_softmax(upcast(student), dim=-1)
    nll = -log_q.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return masked_mean(nll, counted)
