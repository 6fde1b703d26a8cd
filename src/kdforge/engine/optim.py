"""Optimizers and learning-rate schedules from the recipe's ``training`` section."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from kdforge.recipe import TrainingConfig


def build_optimizer(
    params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]], cfg: TrainingConfig
) -> torch.optim.Optimizer:
    """Parameters, or parameter groups (``{"params": [...]}``) that share the recipe's settings; a group's
    ``lr_scale`` multiplies the recipe's learning rate for that group (the schedule applies to all)."""
    opt = cfg.optimizer
    if not isinstance(params, torch.Tensor):
        params = list(params)
        if params and isinstance(params[0], dict):
            params = [_scaled(group, cfg.lr) for group in params]
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=opt.momentum, weight_decay=opt.weight_decay)
    cls = torch.optim.AdamW if opt.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=opt.betas, weight_decay=opt.weight_decay)


def _scaled(group: dict[str, Any], lr: float) -> dict[str, Any]:
    group = dict(group)
    scale = group.pop("lr_scale", None)
    if scale is not None:
        group["lr"] = lr * scale
    return group


def lr_factor(name: str, warmup_steps: int, total_steps: int, step: int) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if name == "constant":
        return 1.0
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    if name == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int) -> LambdaLR:
    sched = cfg.schedule
    return LambdaLR(optimizer, lambda step: lr_factor(sched.name, sched.warmup_steps, total_steps, step))
