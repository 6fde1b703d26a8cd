"""Losses of multi-label classifiers: each class is its own yes/no question, answered by a sigmoid.

A multi-label text classifier (``data.multi_label: true``) gives one logit per class and
its labels are multi-hot ``[B, C]``; the softmax losses (``cross_entropy``, ``hinton_kd``)
would make the classes compete, so these treat every class as a Bernoulli variable.

Example::

    objective:
      - {loss: binary_cross_entropy, field: logits, weight: 0.1}
      - {loss: binary_kd, field: logits, weight: 0.9, params: {temperature: 2.0}}
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdforge.losses.common import check_temperature, masked_mean, upcast
from kdforge.losses.logits import HINTON
from kdforge.losses.registry import register_loss


def _rows(mask: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """A per-example mask [B] widened to every class [B, C]."""
    return None if mask is None else mask.bool().unsqueeze(-1).expand_as(like)


@register_loss("binary_cross_entropy", target="labels")
def binary_cross_entropy(
    student: torch.Tensor, labels: torch.Tensor, *, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Binary cross-entropy of each class's sigmoid against multi-hot labels (multi-label's hard target).

    Args:
        student: logits ``[B, C]``.
        labels: ``[B, C]`` of 0 and 1 (a row may hold several 1s, or none).
        mask: optional ``[B]`` booleans, True = counted.

    Returns:
        Scalar: the mean over counted examples and every class.
    """
    if labels.shape != student.shape:
        raise ValueError(
            f"binary_cross_entropy needs multi-hot labels shaped like the logits {tuple(student.shape)}, got"
            f" {tuple(labels.shape)}; it is the loss of data.multi_label: true"
        )
    per_class = F.binary_cross_entropy_with_logits(upcast(student), labels.to(upcast(student).dtype), reduction="none")
    return masked_mean(per_class, _rows(mask, per_class))


@register_loss("binary_kd", paper=HINTON)
def binary_kd(
    student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-class KL of the teacher's and the student's sigmoids at temperature T, times T^2 (multi-label KD).

    For each class c: KL(Bern(sigmoid(t_c / T)) || Bern(sigmoid(s_c / T))), the Hinton soft
    target with a yes/no distribution per class instead of one softmax over classes; T^2
    keeps gradients comparable across temperatures, as in :func:`~kdforge.losses.hinton_kd`.

    Args:
        student: logits ``[B, C]`` (gradients flow here).
        teacher: logits ``[B, C]``.
        temperature: T > 0.
        mask: optional ``[B]`` booleans, True = counted.

    Returns:
        Scalar: the mean over counted examples and every class.
    """
    check_temperature(temperature)
    if not isinstance(teacher, torch.Tensor) or teacher.shape != student.shape:
        raise ValueError("binary_kd needs the teacher's full logits, shaped like the student's [B, C]")
    s, t = upcast(student) / temperature, upcast(teacher).to(upcast(student).dtype) / temperature
    p = torch.sigmoid(t)
    # KL(p || q) for Bernoulli p, q from logits: p (log p - log q) + (1 - p) (log(1-p) - log(1-q))
    log_p, log_not_p = F.logsigmoid(t), F.logsigmoid(-t)
    log_q, log_not_q = F.logsigmoid(s), F.logsigmoid(-s)
    per_class = p * (log_p - log_q) + (1 - p) * (log_not_p - log_not_q)
    return masked_mean(per_class, _rows(mask, per_class)) * temperature**2
