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
temperature; only the student's logits are divided by it. ``dkd`` adds a bucket for
the label (see :func:`_dkd_buckets`).

Large vocabularies: positions are processed in chunks of about
:data:`kdforge.losses.chunking.CHUNK_ELEMENTS` logits. The six divergences compute
their gradient in closed form on reused chunk buffers (a :class:`FusedKernel` each),
so their extra memory is the student's gradient plus four chunk buffers;
``dkd`` runs its formula under autograd one chunk at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kdforge.losses.chunking import FusedKernel, Teacher, check_pair, fused_per_position, per_position, teacher_tail
from kdforge.losses.common import (
    check_temperature,
    kl_per_position,
    logsumexp_or_neginf,
    masked_mean,
    mean_of_sum,
    upcast,
)
from kdforge.losses.linear import (
    HeadLogits,
    cross_entropy_chunk,
    kernel_chunk,
    linear_or_dense,
    position_count,
    weighted_sum,
)
from kdforge.losses.registry import register_loss
from kdforge.provenance import Paper

HINTON = Paper(
    "Distilling the Knowledge in a Neural Network",
    2015,
    "1503.02531",
    authors="Hinton, Geoffrey and Vinyals, Oriol and Dean, Jeff",
)
GKD = Paper(
    "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes",
    2024,
    "2306.13649",
    authors="Agarwal and others",
)
DISTILLM = Paper(
    "DistiLLM: Towards Streamlined Distillation for Large Language Models", 2024, "2402.03898", authors="Ko and others"
)
MINILLM = Paper("MiniLLM: Knowledge Distillation of Large Language Models", 2024, "2306.08543", authors="Gu and others")
DKD = Paper("Decoupled Knowledge Distillation", 2022, "2203.08679", authors="Zhao and others")


def require_dense_teacher(teacher: Teacher, loss: str, reason: str) -> None:
    """Refuse a top-k teacher in a loss that needs every logit, saying why."""
    if isinstance(teacher, tuple):
        raise ValueError(f"{loss} needs the teacher's dense logits: {reason}, which a top-k teacher cannot give")


def _divergence(
    student: torch.Tensor,
    teacher: Teacher,
    kernel: FusedKernel,
    *,
    temperature: float,
    mask: torch.Tensor | None,
) -> torch.Tensor:
    """The shared reduction: per-position divergence, masked mean over positions, times T^2."""
    check_temperature(temperature)
    student, teacher = linear_or_dense(student, teacher)
    check_pair(student, teacher)
    if isinstance(student, HeadLogits):
        total = weighted_sum(kernel_chunk(kernel, temperature), student, teacher, mask)
        return mean_of_sum(total, position_count(student, mask)) * temperature**2
    return masked_mean(fused_per_position(student, teacher, kernel, temperature), mask) * temperature**2


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


def _log_mixture_into(dest: torch.Tensor, scratch: torch.Tensor, log_a, log_b, weight_a: float) -> torch.Tensor:
    """``dest`` <- log(w*a + (1-w)*b), in place (0 < w < 1); ``scratch`` is overwritten."""
    torch.add(log_a, math.log(weight_a), out=dest)
    torch.add(log_b, math.log1p(-weight_a), out=scratch)
    return torch.logaddexp(dest, scratch, out=dest)


# Fused kernels (see chunking.FusedKernel): value per position, and q_j * df/dq_j left in
# ``out``. Every product that could be 0 * inf (a token with no mass on one side) is
# zeroed where the weighting probability is 0, as kl_per_position does.


def _forward_kl_fused(log_q, log_p, out, tmp):
    torch.exp(log_p, out=out)  # p
    value = torch.sub(log_p, log_q, out=tmp).mul_(out).masked_fill_(out == 0, 0.0).sum(-1)
    out.neg_()  # q * d/dq sum p log(p/q) = -p
    return value


def _reverse_kl_fused(log_q, log_p, out, tmp):
    torch.exp(log_q, out=tmp)  # q
    torch.sub(log_q, log_p, out=out).mul_(tmp).masked_fill_(tmp == 0, 0.0)  # q (log q - log p), the +q cancels
    return out.sum(-1)


def _total_variation_fused(log_q, log_p, out, tmp):
    torch.exp(log_q, out=out)  # q
    torch.exp(log_p, out=tmp).sub_(out)  # p - q
    value = 0.5 * torch.linalg.vector_norm(tmp, ord=1, dim=-1)
    out.mul_(tmp.sign_()).mul_(-0.5)  # q * 0.5 sign(q - p)
    return value


def _jsd_fused(beta: float):
    def fused(log_q, log_p, out, tmp):
        _log_mixture_into(tmp, out, log_p, log_q, beta)  # tmp = log m
        torch.exp(log_p, out=out)
        teacher_side = log_p.sub_(tmp).mul_(out).masked_fill_(out == 0, 0.0).sum(-1)
        torch.sub(log_q, tmp, out=out)
        torch.exp(log_q, out=tmp)
        student_side = out.mul_(tmp).masked_fill_(tmp == 0, 0.0).sum(-1)
        out.mul_(1 - beta)  # q * dJSD/dq = (1 - beta) q log(q / m)
        return beta * teacher_side + (1 - beta) * student_side

    return fused


def _skew_kl_fused(alpha: float):
    def fused(log_q, log_p, out, tmp):
        _log_mixture_into(tmp, out, log_p, log_q, alpha)  # tmp = log m, m = alpha p + (1 - alpha) q
        torch.sub(log_q, tmp, out=out).add_(log_p).exp_().mul_(alpha - 1)  # -(1 - alpha) p q / m
        tmp.neg_().add_(log_p)  # log p - log m
        log_p.exp_()
        value = tmp.mul_(log_p).masked_fill_(log_p == 0, 0.0).sum(-1)
        out.masked_fill_(log_p == 0, 0.0)
        return value

    return fused


def _skew_reverse_kl_fused(alpha: float):
    def fused(log_q, log_p, out, tmp):
        _log_mixture_into(tmp, out, log_p, log_q, 1 - alpha)  # tmp = log m, m = (1 - alpha) p + alpha q
        torch.sub(log_q, tmp, out=out)  # log q - log m
        torch.exp(out, out=log_p)  # q / m
        torch.exp(log_q, out=tmp)  # q
        value = out.mul_(tmp).masked_fill_(tmp == 0, 0.0).sum(-1)
        # q * d/dq sum q log(q/m) = q log(q/m) - alpha q^2 / m (+ q, which cancels)
        out.sub_(log_p.mul_(tmp).mul_(alpha)).masked_fill_(tmp == 0, 0.0)
        return value

    return fused


FORWARD_KL = FusedKernel(_forward_kl_fused, lambda lq, lp: kl_per_position(lp, lq))
REVERSE_KL = FusedKernel(_reverse_kl_fused, lambda lq, lp: kl_per_position(lq, lp))
TOTAL_VARIATION = FusedKernel(_total_variation_fused, lambda lq, lp: 0.5 * (lp.exp() - lq.exp()).abs().sum(-1))


def jsd_kernel(beta: float) -> FusedKernel:
    def formula(log_q: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
        log_m = _log_mixture(log_p, log_q, beta)
        return beta * kl_per_position(log_p, log_m) + (1 - beta) * kl_per_position(log_q, log_m)

    return FusedKernel(_jsd_fused(beta), formula)


def skew_kl_kernel(alpha: float) -> FusedKernel:
    if alpha == 0:
        return FORWARD_KL
    return FusedKernel(_skew_kl_fused(alpha), lambda lq, lp: kl_per_position(lp, _log_mixture(lp, lq, alpha)))


def skew_reverse_kl_kernel(alpha: float) -> FusedKernel:
    if alpha == 0:
        return REVERSE_KL
    return FusedKernel(_skew_reverse_kl_fused(alpha), lambda lq, lp: kl_per_position(lq, _log_mixture(lq, lp, alpha)))


#: each divergence's kernel from its parameters (benchmarks compare the fused and plain paths through these)
KERNELS = {
    "forward_kl": lambda: FORWARD_KL,
    "reverse_kl": lambda: REVERSE_KL,
    "total_variation": lambda: TOTAL_VARIATION,
    "generalized_jsd": jsd_kernel,
    "skew_kl": skew_kl_kernel,
    "skew_reverse_kl": skew_reverse_kl_kernel,
}


@register_loss("forward_kl", paper=HINTON, linear=True)
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
    return _divergence(student, teacher, FORWARD_KL, temperature=temperature, mask=mask)


@register_loss("hinton_kd", paper=HINTON, linear=True)
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


@register_loss("reverse_kl", paper=MINILLM, linear=True)
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
    return _divergence(student, teacher, REVERSE_KL, temperature=temperature, mask=mask)


@register_loss("generalized_jsd", paper=GKD, linear=True)
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

    return _divergence(student, teacher, jsd_kernel(beta), temperature=temperature, mask=mask)


def _check_alpha(alpha: float) -> None:
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")


@register_loss("skew_kl", paper=DISTILLM, linear=True)
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
    return _divergence(student, teacher, skew_kl_kernel(alpha), temperature=temperature, mask=mask)


@register_loss("skew_reverse_kl", paper=DISTILLM, linear=True)
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
    return _divergence(student, teacher, skew_reverse_kl_kernel(alpha), temperature=temperature, mask=mask)


@register_loss("total_variation", linear=True)
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
    return _divergence(student, teacher, TOTAL_VARIATION, temperature=temperature, mask=mask)


@register_loss("dkd", needs_labels=True, paper=DKD)
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
    check_pair(student, teacher)
    if student.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(student.shape)} do not fit labels {tuple(labels.shape)}")
    counted = labels != ignore_index
    if mask is not None:
        counted = counted & mask.bool()
    target = torch.where(counted, labels, torch.zeros_like(labels))

    def per_position_dkd(log_q: torch.Tensor, teacher_side, target: torch.Tensor) -> torch.Tensor:
        if isinstance(teacher_side, tuple):
            log_q, log_p, target = _dkd_buckets(log_q, *teacher_side, target)
        else:
            log_p = teacher_side
        log_b_s, log_nt_s = _split_at_target(log_q, target)
        log_b_t, log_nt_t = _split_at_target(log_p, target)
        return alpha * kl_per_position(log_b_t, log_b_s) + beta * kl_per_position(log_nt_t, log_nt_s)

    per_position_dkd.own_topk = True
    values = per_position(student, teacher, per_position_dkd, temperature, target)
    return masked_mean(values, counted) * temperature**2


def _split_at_target(log_probs: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log of the binary [p_gt, 1 - p_gt] (``[rows, 2]``) and log of the distribution over the other classes."""
    index = target.unsqueeze(-1)
    log_gt = log_probs.gather(-1, index)
    others = log_probs.scatter(-1, index, -math.inf)
    log_rest = logsumexp_or_neginf(others)
    return torch.cat([log_gt, log_rest], dim=-1), F.log_softmax(others, dim=-1)


def _log_or_neginf(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def _dkd_buckets(
    log_q: torch.Tensor, ids: torch.Tensor, log_p_topk: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DKD's k + 2 buckets for a top-k teacher: its k tokens, the label, the rest; and the label's bucket.

    Where the label is among the teacher's k tokens, the label bucket is empty on both
    sides. Where it is not, the teacher's probability of it is unknown: it is taken as
    an even share of the residual mass, r / (V - k), and the rest bucket holds the
    remaining r (V - k - 1) / (V - k); the student's buckets hold its own masses.
    """
    vocab, k = log_q.shape[-1], ids.shape[-1]
    hit = ids == target.unsqueeze(-1)
    if k >= vocab:  # every token is its own bucket
        return log_q.gather(-1, ids), log_p_topk, hit.int().argmax(-1)
    inside = hit.any(-1, keepdim=True)
    label = target.unsqueeze(-1)
    log_q_label = torch.where(inside, -math.inf, log_q.gather(-1, label))
    log_q_rest = logsumexp_or_neginf(log_q.scatter(-1, ids, -math.inf).scatter(-1, label, -math.inf))
    log_r = teacher_tail(log_p_topk)
    share = 1.0 / (vocab - k)
    log_p_label = torch.where(inside, -math.inf, log_r + _log_or_neginf(share))
    log_p_rest = torch.where(inside, log_r, log_r + _log_or_neginf(1.0 - share))
    log_q_b = torch.cat([log_q.gather(-1, ids), log_q_label, log_q_rest], -1)
    log_p_b = torch.cat([log_p_topk, log_p_label, log_p_rest], -1)
    bucket = torch.where(inside.squeeze(-1), hit.int().argmax(-1), torch.full_like(target, k))
    return log_q_b, log_p_b, bucket


@register_loss("cross_entropy", target="labels", linear=True)
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
    if isinstance(student, HeadLogits):
        total = weighted_sum(cross_entropy_chunk, student, safe_labels.reshape(-1, 1), counted)
        return mean_of_sum(total, counted.sum())
    log_q = F.log_softmax(upcast(student), dim=-1)
    nll = -log_q.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return masked_mean(nll, counted)
