"""Divergences between student and teacher logits, and the label cross-entropy.

Shapes: logits are ``[B, C]`` (classification) or ``[B, L, V]`` (sequences);
``mask`` is ``[B]`` or ``[B, L]`` booleans, True where a position counts. Each
divergence sums over the last axis per position, then averages over the counted
positions of the whole batch (not a mean of per-sequence means). Arithmetic is in
float32 whatever the input dtype, and ``-inf`` logits (a masked vocabulary) never
produce NaN.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdforge.losses.registry import register_loss


def _masked_mean(per_position: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``per_position`` ([B] or [B, L]) over the positions where mask is True."""
    if mask is None:
        return per_position.mean()
    if mask.shape != per_position.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(per_position.shape)}")
    weights = mask.to(per_position.dtype)
    # clamp: an all-masked batch contributes 0 instead of 0/0 = NaN
    return (per_position * weights).sum() / weights.sum().clamp_min(1.0)


def _check_pair(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ;"
            " nothing is broadcast"
        )


def _kl_per_position(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_i p_i (log p_i - log q_i) over the last axis; terms with p_i = 0 are 0."""
    p = log_p.exp()
    diff = torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))
    return (p * diff).sum(-1)


@register_loss("forward_kl")
def forward_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
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
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    _check_pair(student, teacher)
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    return _masked_mean(_kl_per_position(log_p, log_q), mask) * temperature**2


@register_loss("hinton_kd")
def hinton_kd(
    student: torch.Tensor,
    teacher: torch.Tensor,
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
    log_q = F.log_softmax(student.float(), dim=-1)
    nll = -log_q.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    return _masked_mean(nll, counted)
