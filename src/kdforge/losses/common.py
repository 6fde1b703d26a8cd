"""Pieces every loss family shares: dtype policy, the masked mean, the KL of log-probabilities.

Not a loss module: it registers nothing.
"""

from __future__ import annotations

import math

import torch

from kdforge.distributed import current_share, global_mean


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision inputs; float64 stays float64 (references, gradcheck)."""
    return x if x.dtype == torch.float64 else x.float()


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the positions where ``mask`` (same shape) is True.

    In a training step on several processes it is the mean over the global batch:
    counts are summed over processes before dividing (:func:`kdforge.distributed.global_mean`),
    so the result does not depend on how the batch was split.
    """
    if mask is not None and mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(values.shape)}")
    if current_share() is not None:
        if mask is None:
            return global_mean(values.sum(), values.new_tensor(float(values.numel())))
        weights = mask.to(values.dtype)
        return global_mean((values * weights).sum(), weights.sum())
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    # clamp: an all-masked batch contributes 0 instead of 0/0 = NaN
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def mean_of_sum(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """:func:`masked_mean` from the masked sum of the values and the count of counted positions
    (the fused linear losses compute the sum themselves); the same reduction on several processes."""
    if current_share() is not None:
        return global_mean(total, count.to(total.dtype))
    return total / count.to(total.dtype).clamp_min(1.0)


def kl_per_position(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """sum_i p_i (log p_i - log q_i) over the last axis; terms with p_i = 0 are 0.

    The ``where`` sits inside the product, so no 0 * inf reaches the backward pass.
    """
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))).sum(-1)


def logsumexp_or_neginf(x: torch.Tensor) -> torch.Tensor:
    """logsumexp over the last axis (keepdim), -inf for an all -inf row, with no NaN gradient there.

    torch.logsumexp of an all -inf row is -inf, but its gradient is 0/0 = NaN; such rows
    are computed on zeros instead and their result replaced.
    """
    empty = torch.isneginf(x).all(-1, keepdim=True)
    result = torch.logsumexp(x.masked_fill(empty, 0.0), dim=-1, keepdim=True)
    return result.masked_fill(empty, -math.inf)


def check_temperature(temperature: float) -> None:
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be > 0 and finite, got {temperature}")
