"""Feature distillation: embeddings, hidden states and MiniLM's self-attention knowledge.

Shapes: embeddings are ``[B, D]``; hidden states, values and the (q, k, v) of a layer
are ``[B, L, H]``; attention probabilities are ``[B, heads, L, L]`` (queries x keys, as
transformers returns them with ``output_attentions=True``). ``mask`` is ``[B]`` for
embeddings and ``[B, L]`` for sequences, True where a row or token counts. Sequence
losses average over the counted positions of the whole batch (not a mean of
per-sequence means). Arithmetic is in float32 whatever the input dtype (float64 stays
float64, for gradient checks).

These losses compare one tensor (one layer); choosing the layer is the caller's job.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kdforge.losses.common import kl_per_position, masked_mean, upcast
from kdforge.losses.registry import register_loss
from kdforge.provenance import Paper

REIMERS = Paper(
    "Making Monolingual Sentence Embeddings Multilingual using Knowledge Distillation",
    2020,
    "2004.09813",
    authors="Reimers, Nils and Gurevych, Iryna",
)
EMBEDDISTILL = Paper(
    "EmbedDistill: A Geometric Knowledge Distillation for Information Retrieval",
    2023,
    "2301.12005",
    authors="Kim and others",
)
FITNETS = Paper("FitNets: Hints for Thin Deep Nets", 2015, "1412.6550", authors="Romero and others")
MINILM = Paper(
    "MiniLM: Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers",
    2020,
    "2002.10957",
    authors="Wang and others",
)
MINILM_V2 = Paper(
    "MiniLMv2: Multi-Head Self-Attention Relation Distillation for Compressing Pretrained Transformers",
    2021,
    "2012.15828",
    authors="Wang and others",
)
# Floor for probabilities before a log: a student zero where the teacher has mass then
# gives a large finite KL term (about p * 87) instead of inf, and a zero never gives NaN.
_TINY = torch.finfo(torch.float32).tiny


def _check_same_shape(student: torch.Tensor, teacher: torch.Tensor, what: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student {what} {tuple(student.shape)} and teacher {what} {tuple(teacher.shape)} differ;"
            " nothing is broadcast"
        )


@register_loss("embedding_mse", paper=REIMERS)
def embedding_mse(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean squared error between student and teacher embeddings [B, D], averaged over all elements.

    The embedding-matching loss of Reimers & Gurevych 2020, "Making Monolingual Sentence
    Embeddings Multilingual using Knowledge Distillation" (sentence-transformers
    ``MSELoss``); the same reduction as ``torch.nn.functional.mse_loss``.

    Args:
        student_emb: ``[B, D]`` student embeddings (gradients flow here).
        teacher_emb: ``[B, D]`` teacher embeddings; a different D needs a projection
            (see :func:`hidden_mse`).
        mask: ``[B]`` booleans, True = the row counts; default all.

    Returns:
        Scalar: squared error averaged over the counted rows and the D dimensions.
    """
    _check_same_shape(student_emb, teacher_emb, "embeddings")
    per_row = ((upcast(student_emb) - upcast(teacher_emb)) ** 2).mean(-1)
    return masked_mean(per_row, None if mask is None else mask.bool())


@register_loss("cosine_distance", paper=EMBEDDISTILL)
def cosine_distance(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cosine distance 1 - cos(student, teacher) between embeddings [B, D].

    Matches the direction of the teacher's embeddings and ignores their length
    (sentence-transformers ``EmbedDistillLoss(distance_metric="cosine")``; Kim et al.
    2023, "EmbedDistill"). A zero vector has cosine 0 with everything (torch's eps).

    Args:
        student_emb: ``[B, D]`` student embeddings (gradients flow here).
        teacher_emb: ``[B, D]`` teacher embeddings.
        mask: ``[B]`` booleans, True = the row counts; default all.

    Returns:
        Scalar in [0, 2]: 1 - cosine similarity, averaged over the counted rows.
    """
    _check_same_shape(student_emb, teacher_emb, "embeddings")
    per_row = 1 - F.cosine_similarity(upcast(student_emb), upcast(teacher_emb), dim=-1)
    return masked_mean(per_row, None if mask is None else mask.bool())


@register_loss("hidden_mse", code_only=("projection",), paper=FITNETS)
def hidden_mse(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    *,
    projection: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between (optionally projected) student and teacher hidden states [B, L, H], over counted positions.

    The hidden-state loss of TinyBERT (Jiao et al. 2020) and FitNets (Romero et al.
    2015): when the student is narrower, a learned projection (e.g. an ``nn.Linear``
    trained with the student) maps its hidden states to the teacher's width. The
    projection runs in the student's dtype; the error is computed in float32. A
    recipe cannot set ``projection``; code that builds the objective can.

    Args:
        student_hidden: ``[B, L, H_s]`` (or ``[B, H_s]``) student hidden states (gradients flow here).
        teacher_hidden: ``[B, L, H_t]`` teacher hidden states.
        projection: optional callable / ``nn.Module`` applied to the student hidden
            states, mapping H_s to H_t. Without one, H_s must equal H_t.
        mask: ``[B, L]`` booleans, True = the token counts; default all.

    Returns:
        Scalar: squared error averaged over counted positions and hidden units.
    """
    if projection is not None:
        student_hidden = projection(student_hidden)
    if student_hidden.shape != teacher_hidden.shape:
        if student_hidden.shape[:-1] == teacher_hidden.shape[:-1]:
            s, t = student_hidden.shape[-1], teacher_hidden.shape[-1]
            sizes = f"hidden sizes differ ({s} for the student, {t} for the teacher)"
            if projection is not None:
                raise ValueError(f"{sizes} after the projection; it must output {t}")
            # only code can pass a projection: the message also says what a recipe can do instead
            raise ValueError(
                f"{sizes} and no projection was given; add one (in code: projection=nn.Linear({s}, {t})), or in a"
                " recipe give the student the teacher's hidden size or use mi_alpha, which learns the mapping"
            )
        _check_same_shape(student_hidden, teacher_hidden, "hidden states")
    per_position = ((upcast(student_hidden) - upcast(teacher_hidden)) ** 2).mean(-1)
    return masked_mean(per_position, None if mask is None else mask.bool())


def _check_query_mask(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    if mask is None:
        return None
    if mask.shape != (batch, length):
        raise ValueError(f"mask must be [B, L] = [{batch}, {length}], got {tuple(mask.shape)}")
    return mask.bool()


@register_loss("attention_kl", paper=MINILM)
def attention_kl(
    student_attn: torch.Tensor,
    teacher_attn: torch.Tensor,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MiniLM attention transfer: KL(teacher || student) per attention row [B, H, L, L], mean over heads and queries.

    The self-attention distribution transfer of MiniLM (Wang et al. 2020, "MiniLM:
    Deep Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained
    Transformers"), usually on the last layer of each model. Teacher and student need
    the same number of heads; their hidden sizes may differ. Inputs are probabilities
    (each query row sums to 1 over the keys), not scores; padded keys already have
    zero probability. Probabilities are floored at float32's smallest normal number
    before the log, so zeros never give NaN (nor inf).

    Args:
        student_attn: ``[B, H, L, L]`` student attention probabilities (gradients flow here).
        teacher_attn: ``[B, H, L, L]`` teacher attention probabilities.
        mask: ``[B, L]`` booleans, True = a real token; padded queries do not count.

    Returns:
        Scalar: KL summed over keys, averaged over heads and the counted query
        positions of the whole batch.
    """
    if student_attn.ndim != 4 or teacher_attn.ndim != 4:
        raise ValueError(
            f"attentions must be [B, heads, L, L]; got student {tuple(student_attn.shape)}"
            f" and teacher {tuple(teacher_attn.shape)}"
        )
    if student_attn.shape[1] != teacher_attn.shape[1]:
        raise ValueError(
            f"attention_kl needs the same number of heads: the student has {student_attn.shape[1]},"
            f" the teacher {teacher_attn.shape[1]} (use qkv_relations, whose relation heads are free)"
        )
    _check_same_shape(student_attn, teacher_attn, "attentions")
    batch, _, length, keys = student_attn.shape
    if keys != length:
        raise ValueError(f"attentions must be square over queries and keys, got {tuple(student_attn.shape)}")
    mask = _check_query_mask(mask, batch, length)
    p = upcast(teacher_attn)
    log_p = p.clamp_min(_TINY).log()
    log_q = upcast(student_attn).clamp_min(_TINY).log()
    # p * where(...) as in _kl_rows, but from probabilities (p may be exactly 0)
    per_row = (p * torch.where(p > 0, log_p - log_q, torch.zeros_like(p))).sum(-1)  # [B, H, L]
    return masked_mean(per_row.mean(1), mask)


def _relation_log_probs(x: torch.Tensor, heads: int, mask: torch.Tensor | None, side: str) -> torch.Tensor:
    """log softmax(X_a X_a^T / sqrt(d)) per head a, ``[B, heads, L, L]``; padded keys get zero probability."""
    batch, length, width = x.shape
    if width % heads:
        raise ValueError(f"the {side}'s size {width} does not split into {heads} heads")
    head_size = width // heads
    xh = upcast(x).reshape(batch, length, heads, head_size).transpose(1, 2)
    scores = xh @ xh.transpose(-1, -2) / math.sqrt(head_size)
    if mask is not None:
        # the most negative finite value, as transformers does: exp gives exactly 0, and a
        # fully padded row stays finite (uniform) instead of NaN
        scores = scores.masked_fill(~mask[:, None, None, :], torch.finfo(scores.dtype).min)
    return F.log_softmax(scores, dim=-1)


def _relation_kl(student: torch.Tensor, teacher: torch.Tensor, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ValueError(f"the number of heads must be a positive integer, got {heads!r}")
    for side, x in (("student", student), ("teacher", teacher)):
        if x.ndim != 3:
            raise ValueError(f"{side} tensor must be [B, L, D], got shape {tuple(x.shape)}")
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must share [B, L]; nothing is broadcast"
        )
    mask = _check_query_mask(mask, *teacher.shape[:2])
    log_q = _relation_log_probs(student, heads, mask, "student")
    log_p = _relation_log_probs(teacher, heads, mask, "teacher")
    return masked_mean(kl_per_position(log_p, log_q).mean(1), mask)


@register_loss("value_relation", paper=MINILM)
def value_relation(
    student_values: torch.Tensor,
    teacher_values: torch.Tensor,
    *,
    num_heads: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MiniLM value relation: KL between teacher and student softmax(V V^T / sqrt(d_head)) per head.

    The value-relation transfer of MiniLM (Wang et al. 2020): values ``[B, L, D]`` (the
    heads concatenated) are split into ``num_heads`` heads of size D / num_heads; each
    head's relation is the L x L row-softmax of V_a V_a^T / sqrt(d_head). Student and
    teacher D may differ (the relations are L x L); both split into ``num_heads``
    heads. Padded keys are masked out of the softmax.

    Args:
        student_values: ``[B, L, D_s]`` student values (gradients flow here).
        teacher_values: ``[B, L, D_t]`` teacher values.
        num_heads: heads both sides are split into (MiniLM: the attention heads, equal
            for teacher and student). D_s and D_t must be divisible by it.
        mask: ``[B, L]`` booleans, True = a real token: padded keys are left out of the
            softmax and padded queries do not count.

    Returns:
        Scalar: KL(teacher relation || student relation) summed over keys, averaged over
        heads and the counted query positions of the whole batch.
    """
    return _relation_kl(student_values, teacher_values, num_heads, mask)


@register_loss("qkv_relations", paper=MINILM_V2)
def qkv_relations(
    student_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    teacher_qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    *,
    relation_heads: int,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MiniLMv2: sum of the Q-Q, K-K and V-V relation KLs with relation_heads heads.

    Multi-head self-attention relation distillation (Wang et al. 2021, "MiniLMv2"):
    each of the queries, keys and values ``[B, L, D]`` (heads concatenated) is re-split
    into ``relation_heads`` heads of size D / relation_heads, and the relation
    softmax(X_r X_r^T / sqrt(d_r)) of the teacher is transferred to the student's as in
    :func:`value_relation`. The three KLs are summed, as in the paper and PaddleNLP's
    re-implementation (each averaged over relation heads and counted queries).
    Hidden sizes may differ between student and teacher. Relation heads in the paper:
    48 for base-size teachers, 64 for large ones.

    Args:
        student_qkv: ``(q, k, v)``, each ``[B, L, D_s]`` (gradients flow here).
        teacher_qkv: ``(q, k, v)``, each ``[B, L, D_t]``.
        relation_heads: relation heads A_r; D_s and D_t must be divisible by it.
        mask: ``[B, L]`` booleans, True = a real token: padded keys are left out of the
            softmax and padded queries do not count.

    Returns:
        Scalar: KL_QQ + KL_KK + KL_VV.
    """
    for side, qkv in (("student", student_qkv), ("teacher", teacher_qkv)):
        if not isinstance(qkv, (tuple, list)) or len(qkv) != 3:
            raise ValueError(f"{side}_qkv must be a tuple (q, k, v) of [B, L, D] tensors")
    qq, kk, vv = (_relation_kl(s, t, relation_heads, mask) for s, t in zip(student_qkv, teacher_qkv))
    return qq + kk + vv
