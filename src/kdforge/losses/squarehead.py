"""SquareHead: every layer's hidden states, each error normalised by the teacher's magnitude there.

The per-layer feature loss of sparse fine-tuning (Kurtic et al. 2023; METHODS.md section 23): for
each layer ``l`` after the embeddings,
``SH_l = mean((h_s^l - h_t^l)^2) / (mean((h_t^l)^2) + eps)``, the means over the counted tokens and
all channels, and the loss is the **sum** over layers (not their mean), as the authors' code has it.
Normalising by the teacher's magnitude makes layers of very different scales count alike. ``eps``
defaults to bfloat16's machine epsilon (2**-7), the authors' value, which is not negligible for
layers of small magnitude. Student and teacher must have the same depth and width (the student is
the teacher, sparsified).
"""

from __future__ import annotations

import torch

from kdforge.losses.common import masked_mean, upcast
from kdforge.losses.registry import register_loss
from kdforge.provenance import Paper

SPARSE_FINETUNING = Paper(
    "Sparse Fine-tuning for Inference Acceleration of Large Language Models",
    2023,
    "2310.06927",
    authors="Kurtic, Eldar and Kuznedelev, Denis and Frantar, Elias and Goin, Michael and Alistarh, Dan",
)

#: bfloat16's machine epsilon, the authors' eps
BF16_EPS = 2.0**-7


@register_loss("squarehead", paper=SPARSE_FINETUNING)
def squarehead(
    student_states: tuple[torch.Tensor, ...],
    teacher_states: tuple[torch.Tensor, ...],
    *,
    eps: float = BF16_EPS,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum over layers of the hidden states' MSE normalised by the teacher's mean square (SquareHead).

    Args:
        student_states: ``hidden_states`` of the student, one ``[B, L, H]`` per layer, the embeddings
            first (left out, as in the paper's code).
        teacher_states: the teacher's, as many and of the same shapes.
        eps: added to each layer's denominator.
        mask: ``[B, L]``, True where a token counts; default all.

    Returns:
        Scalar: ``sum_l mean((s_l - t_l)^2) / (mean(t_l^2) + eps)`` over layers 1..n.

    Example::

        loss = squarehead(student_out.hidden_states, teacher_out.hidden_states, mask=attention_mask)
    """
    if not isinstance(student_states, (tuple, list)) or not isinstance(teacher_states, (tuple, list)):
        raise ValueError("squarehead compares every layer: use field hidden_states (one tensor per layer)")
    if len(student_states) != len(teacher_states):
        raise ValueError(
            f"the student has {len(student_states)} hidden states and the teacher {len(teacher_states)}; squarehead"
            " pairs layer l with layer l, so the student must have the teacher's depth"
        )
    if len(student_states) < 2:
        raise ValueError("squarehead needs at least one layer after the embeddings")
    mask = None if mask is None else mask.bool()
    total = None
    for s, t in zip(student_states[1:], teacher_states[1:]):
        if s.shape != t.shape:
            raise ValueError(f"student hidden states {tuple(s.shape)} and teacher's {tuple(t.shape)} differ")
        s, t = upcast(s), upcast(t).detach()
        error = masked_mean(((s - t) ** 2).mean(-1), mask)
        scale = masked_mean((t**2).mean(-1), mask)
        term = error / (scale + eps)
        total = term if total is None else total + term
    assert total is not None
    return total
