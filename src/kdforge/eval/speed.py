"""Inference throughput and model size."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_on_disk(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files if f.is_file())


@dataclass(frozen=True)
class Speed:
    """What :func:`timed_throughput` measured: the median rate, and how many repeats were timed."""

    rate: float
    repeats: int


@torch.no_grad()
def timed_throughput(
    forward: Callable[[dict[str, Any]], Any],
    batch: dict[str, Any],
    *,
    batches: int,
    repeats: int,
    items: int | None = None,
    seconds: float | None = None,
) -> Speed:
    """Items per second: the median over at most ``repeats`` timings of ``batches`` forward passes.

    ``items``: what one pass processes (default: the batch's examples; a language model
    counts tokens). One untimed pass first warms caches and lazy initialisation.
    ``seconds``: no repeat starts once the timed ones have taken this long (the first always
    runs), so a slow model is measured in bounded time; None: always ``repeats``.
    """
    size = items if items is not None else len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))
    forward(batch)
    rates = []
    began = time.perf_counter()
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            forward(batch)
        end = time.perf_counter()
        rates.append(size * batches / (end - start))
        if seconds is not None and end - began >= seconds:
            break
    return Speed(statistics.median(rates), len(rates))


def throughput(
    forward: Callable[[dict[str, Any]], Any],
    batch: dict[str, Any],
    *,
    batches: int,
    repeats: int,
    items: int | None = None,
) -> float:
    """Items per second: the median over ``repeats`` timings of ``batches`` forward passes
    (:func:`timed_throughput` with every repeat timed)."""
    return timed_throughput(forward, batch, batches=batches, repeats=repeats, items=items).rate
