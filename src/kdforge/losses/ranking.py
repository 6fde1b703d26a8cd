"""Ranking distillation: the student learns the teacher's scores over candidate documents.

Shapes: scores are ``[B, N]``, one row per query and one column per candidate
document; ``mask`` is ``[B, N]`` booleans, True where a candidate is real. Listwise
losses reduce over the candidate axis per query, then average over the queries that
have at least one candidate. Arithmetic is in float32 whatever the input dtype
(float64 stays float64, for gradient checks), and ``-inf`` scores (a candidate the
caller excluded) never produce NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdforge.losses.common import check_temperature, kl_per_position, masked_mean, upcast
from kdforge.losses.registry import register_loss
from kdforge.provenance import Paper

MARGIN_MSE = Paper(
    "Improving Efficient Neural Ranking Models with Cross-Architecture Knowledge Distillation",
    2020,
    "2010.02666",
    authors="Hofstätter and others",
)
TCT = Paper(
    "Distilling Dense Representations for Ranking using Tightly-Coupled Teachers",
    2020,
    "2010.11386",
    authors="Lin, Sheng-Chieh and Yang, Jheng-Hong and Lin, Jimmy",
)
DISTILL_VQ = Paper(
    "Distill-VQ: Learning Retrieval Oriented Vector Quantization By Distilling Knowledge from Dense Embeddings",
    2022,
    "2204.00185",
    authors="Xiao and others",
)
DPR = Paper(
    "Dense Passage Retrieval for Open-Domain Question Answering", 2020, "2004.04906", authors="Karpukhin and others"
)


def _check_scores(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Validate ``[B, N]`` score pairs and return the mask as booleans."""
    if student.ndim != 2:
        raise ValueError(f"scores must be [B, N] (queries x candidates), got shape {tuple(student.shape)}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student scores {tuple(student.shape)} and teacher scores {tuple(teacher.shape)} differ;"
            " nothing is broadcast"
        )
    if mask is None:
        return None
    if mask.shape != student.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match scores {tuple(student.shape)}")
    return mask.bool()


def _listwise_log_probs(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax over candidates of s/T and t/T, masked candidates given zero probability."""
    s = upcast(student) / temperature
    t = upcast(teacher) / temperature
    if mask is not None:
        # The most negative finite value, not -inf: a query whose candidates are all masked
        # then gets a uniform (finite) row, which the query weighting drops, instead of NaN.
        s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
        t = t.masked_fill(~mask, torch.finfo(t.dtype).min)
    return F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1)


def _query_weights(mask: torch.Tensor | None) -> torch.Tensor | None:
    """True for the queries that have at least one real candidate."""
    return None if mask is None else mask.any(dim=-1)


@register_loss("listwise_kl", paper=TCT)
def listwise_kl(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    *,
    temperature: float = 1.0,
    teacher_temperature: float | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Listwise KL(softmax(t/T_t) || softmax(s/T)) over each query's candidates, mean over queries, times T^2.

    The listwise variant of ranking distillation (Lin et al. 2020, "Distilling Dense
    Representations for Ranking using Tightly-Coupled Teachers"; sentence-transformers
    ``DistillKLDivLoss`` with one shared temperature; the KL distillation of Geng et
    al. 2024's inference-free sparse retriever at T = 1). The T^2 factor is applied
    once, so gradient magnitudes stay comparable across temperatures.

    Args:
        student_scores: ``[B, N]`` student scores of N candidates per query (gradients flow here).
        teacher_scores: ``[B, N]`` teacher scores of the same candidates.
        temperature: T > 0 divides both score tensors; default 1.
        teacher_temperature: T_t > 0 divides the teacher's scores instead, when they live on
            another scale than the student's: an ensemble's min-max normalised scores lie in
            [0, 1], which Geng et al. multiply by 30 (T_t = 1/30) before a KL at T = 1.
            Default: T.
        mask: ``[B, N]`` booleans, True = a real candidate; masked candidates are left
            out of both softmaxes. Default: all candidates are real.

    Returns:
        Scalar: per-query KL summed over candidates, averaged over the queries with at
        least one real candidate, times T^2.
    """
    check_temperature(temperature)
    mask = _check_scores(student_scores, teacher_scores, mask)
    if teacher_temperature is not None:
        check_temperature(teacher_temperature)
        teacher_scores = upcast(teacher_scores) * (temperature / teacher_temperature)
    log_q, log_p = _listwise_log_probs(student_scores, teacher_scores, temperature, mask)
    # p = 0 (masked or -inf candidates) contributes 0, even where log q is -inf
    per_query = kl_per_position(log_p, log_q)
    return masked_mean(per_query, _query_weights(mask)) * temperature**2


@register_loss("listnet", paper=DISTILL_VQ)
def listnet(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """ListNet cross-entropy -sum softmax(t/T) * log_softmax(s/T) over each query's candidates, mean over queries.

    The loss of Distill-VQ (Xiao et al. 2022, "Distill-VQ: Learning Retrieval Oriented
    Vector Quantization by Distilling Knowledge from Dense Embeddings"), whose code
    divides both score sets by the temperature and applies no T^2 factor; neither does
    this function. It equals :func:`listwise_kl` / T^2 plus the teacher's entropy,
    which has no gradient for the student. Distill-VQ writes log(softmax(s) + 1e-6);
    the exact log_softmax is used here (it needs no epsilon to stay finite).

    Args:
        student_scores: ``[B, N]`` student scores (gradients flow here).
        teacher_scores: ``[B, N]`` teacher scores.
        temperature: T > 0 divides both score tensors; default 1.
        mask: ``[B, N]`` booleans, True = a real candidate; masked candidates are left
            out of both softmaxes. Default: all candidates are real.

    Returns:
        Scalar: per-query cross-entropy summed over candidates, averaged over the
        queries with at least one real candidate.
    """
    check_temperature(temperature)
    mask = _check_scores(student_scores, teacher_scores, mask)
    log_q, log_p = _listwise_log_probs(student_scores, teacher_scores, temperature, mask)
    p = log_p.exp()
    per_query = -(p * torch.where(p > 0, log_q, torch.zeros_like(p))).sum(-1)
    return masked_mean(per_query, _query_weights(mask))


def _margin_squared_errors(
    student_pos: torch.Tensor,
    student_neg: torch.Tensor,
    teacher_pos: torch.Tensor,
    teacher_neg: torch.Tensor,
) -> torch.Tensor:
    """((s_pos - s_neg_k) - (t_pos - t_neg_k))^2 as ``[B, K]``."""
    if student_pos.ndim != 1 or student_pos.shape != teacher_pos.shape:
        raise ValueError(
            f"positive scores must both be [B]; got student {tuple(student_pos.shape)}"
            f" and teacher {tuple(teacher_pos.shape)}"
        )
    if student_neg.shape != teacher_neg.shape:
        raise ValueError(
            f"student negatives {tuple(student_neg.shape)} and teacher negatives {tuple(teacher_neg.shape)}"
            " differ; nothing is broadcast"
        )
    batch = student_pos.shape[0]
    if student_neg.ndim not in (1, 2) or student_neg.shape[0] != batch:
        raise ValueError(
            f"negative scores must be [B] or [B, K] with B = {batch} (the positives'), got {tuple(student_neg.shape)}"
        )
    if student_neg.ndim == 1:
        student_neg, teacher_neg = student_neg.unsqueeze(1), teacher_neg.unsqueeze(1)
    student_margin = upcast(student_pos).unsqueeze(1) - upcast(student_neg)
    teacher_margin = upcast(teacher_pos).unsqueeze(1) - upcast(teacher_neg)
    return (student_margin - teacher_margin) ** 2


def margin_mse(
    student_pos: torch.Tensor,
    student_neg: torch.Tensor,
    teacher_pos: torch.Tensor,
    teacher_neg: torch.Tensor,
) -> torch.Tensor:
    """Margin-MSE: mean of ((s_pos - s_neg) - (t_pos - t_neg))^2.

    Hofstätter et al. 2020, "Improving Efficient Neural Ranking Models with
    Cross-Architecture Knowledge Distillation". With K negatives per query, each
    positive is paired with each of its negatives (the multi-negative form of
    sentence-transformers ``MarginMSELoss``).

    Args:
        student_pos: ``[B]`` student scores of each query's positive (gradients flow here).
        student_neg: ``[B]`` or ``[B, K]`` student scores of the negatives.
        teacher_pos: ``[B]`` teacher scores of the positives.
        teacher_neg: teacher scores of the negatives, the shape of ``student_neg``.

    Returns:
        Scalar: the squared margin error averaged over all B*K (query, negative) pairs.
    """
    return _margin_squared_errors(student_pos, student_neg, teacher_pos, teacher_neg).mean()


@register_loss("margin_mse", paper=MARGIN_MSE)
def margin_mse_scores(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Margin-MSE on [B, 1+K] scores (positive in column 0): MSE of margins s_pos - s_neg_k against the teacher's.

    The registry form of :func:`margin_mse`: each row holds a query's positive score in
    column 0 and its K >= 1 negatives' scores after it, for the student and the teacher.

    Args:
        student: ``[B, 1+K]`` student scores, positive first (gradients flow here).
        teacher: ``[B, 1+K]`` teacher scores, same layout.
        mask: ``[B, 1+K]`` booleans, True = a real candidate. A (query, negative) pair
            counts when both its positive and its negative are real. Default: all real.

    Returns:
        Scalar: the squared margin error averaged over the counted (query, negative) pairs.
    """
    if student.ndim != 2 or student.shape[1] < 2:
        raise ValueError(
            f"margin_mse scores must be [B, 1+K] with the positive in column 0 and K >= 1 negatives,"
            f" got shape {tuple(student.shape)}"
        )
    mask = _check_scores(student, teacher, mask)
    errors = _margin_squared_errors(student[:, 0], student[:, 1:], teacher[:, 0], teacher[:, 1:])
    pairs = None if mask is None else mask[:, :1] & mask[:, 1:]
    return masked_mean(errors, pairs)


@register_loss("contrastive", target="labels", paper=DPR)
def contrastive(
    student: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 0.05,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE over each query's candidates: cross-entropy of softmax(s/T) against the relevant candidate.

    The labels-only objective of dense retrieval (Karpukhin et al. 2020, DPR; van den Oord
    et al. 2018), with hard negatives as extra candidates; sentence-transformers'
    ``MultipleNegativesRankingLoss`` is the in-batch form, with scale 20 = 1 / 0.05. It is
    the no-distillation baseline of the ranking task.

    Args:
        student: ``[B, N]`` scores of each query's candidates (cosine similarities, typically).
        labels: ``[B]`` the column of each query's relevant candidate.
        temperature: T > 0 divides the scores; default 0.05. No T^2 factor (no teacher).
        mask: ``[B, N]`` booleans, True = a real candidate. Default: all real.

    Returns:
        Scalar: mean negative log-likelihood of the relevant candidate over the queries.
    """
    check_temperature(temperature)
    if student.ndim != 2 or labels.shape != student.shape[:1]:
        raise ValueError(
            f"contrastive needs scores [B, N] and labels [B]; got {tuple(student.shape)} and {tuple(labels.shape)}"
        )
    scores = upcast(student) / temperature
    if mask is not None:
        if mask.shape != student.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match scores {tuple(student.shape)}")
        scores = scores.masked_fill(~mask.bool(), torch.finfo(scores.dtype).min)
    # per query, then masked_mean: the mean over the queries of the global batch on several processes
    return masked_mean(F.cross_entropy(scores, labels.long(), reduction="none"), None)
