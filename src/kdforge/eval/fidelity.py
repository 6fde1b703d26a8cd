"""Fidelity of a student to its teacher, measured on the same inputs."""

from __future__ import annotations

import torch

from kdforge.losses.logits import forward_kl


def fidelity(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement and mean KL(p_teacher || q_student) at T = 1 (nats per example)."""
    agreement = (teacher_logits.argmax(-1) == student_logits.argmax(-1)).float().mean()
    kl = forward_kl(student_logits.double(), teacher_logits.double(), temperature=1.0)
    return {"top1_agreement": float(agreement), "mean_kl": float(kl)}
