"""Regularisers for learned sparse retrievers (SPLADE-style term weights over the vocabulary).

Shapes: term weights are ``[B, V]``, one row per text and one column per vocabulary
term. Arithmetic is in float32 whatever the input dtype (float64 stays float64, for
gradient checks).
"""

from __future__ import annotations

import torch

from kdforge.losses.common import upcast
from kdforge.losses.registry import register_loss
from kdforge.provenance import Paper

FLOPS = Paper(
    "Minimizing FLOPs to Learn Efficient Sparse Representations", 2020, "2004.05665", authors="Paria and others"
)


def flops(weights: torch.Tensor) -> torch.Tensor:
    """FLOPS regulariser: sum over the vocabulary of (mean over the batch of |w|)^2.

    Paria et al. 2020, "Minimizing FLOPs to Learn Efficient Sparse Representations";
    used by SPLADE and by the inference-free sparse retriever of Geng et al. 2024 on
    the document side. It approximates the expected number of floating-point
    operations of a sparse dot product, so it pushes whole vocabulary columns to zero
    rather than single entries. The weights are usually non-negative already
    (log(1 + ReLU(.))); the absolute value makes the penalty well defined otherwise.

    Args:
        weights: ``[B, V]`` term weights (gradients flow here). ``[B, G, V]`` (G candidate
            slots per query) takes the batch mean per slot and sums over slots, as Geng et
            al.'s code does.

    Returns:
        Scalar: sum_v (mean_b |w_bv|)^2 (summed over slots too for ``[B, G, V]``).
    """
    if weights.ndim not in (2, 3):
        raise ValueError(f"flops weights must be [B, V] (or [B, G, V]), got shape {tuple(weights.shape)}")
    return (upcast(weights).abs().mean(0) ** 2).sum()


@register_loss("flops", target="none", couples_batch=True, paper=FLOPS)
def flops_regulariser(
    student: torch.Tensor,
    teacher: object = None,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """FLOPS sparsity regulariser on the student's term weights [B, V]: sum_v (mean_b |w_bv|)^2; the teacher is ignored.

    The registry form of :func:`flops`: a term on the student's own output field,
    added to a distillation loss with a small weight (Geng et al.'s demo: 0.002,
    warmed up quadratically over the first steps through the term's weight schedule).
    ``teacher`` is accepted for the loss contract and not used.

    Args:
        student: ``[B, V]`` term weights of the student (gradients flow here).
        teacher: ignored.
        mask: ``[B]`` booleans, True = the row counts; the batch mean is taken over the
            counted rows only. Default: all rows.

    Returns:
        Scalar: :func:`flops` of the counted rows (0 when no row counts).
    """
    if mask is not None:
        if mask.shape != student.shape[:1]:
            raise ValueError(f"flops mask must be [B] = [{student.shape[0]}], got {tuple(mask.shape)}")
        student = student[mask.bool()]
        if student.shape[0] == 0:
            # no counted row: a zero that keeps the graph (the mean of nothing would be NaN)
            return upcast(student).sum()
    return flops(student)
