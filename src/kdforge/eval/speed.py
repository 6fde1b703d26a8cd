"""Inference throughput and model size."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def size_on_disk(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files if f.is_file())


@torch.no_grad()
def throughput(
    forward: Callable[[dict[str, Any]], Any],
    batch: dict[str, Any],
    *,
    batches: int,
    repeats: int,
    items: int | None = None,
) -> float:
    """Items per second: the median over ``repeats`` timings of ``batches`` forward passes.

    ``items``: what one pass processes (default: the batch's examples; a language model
    counts tokens). One untimed pass first warms caches and lazy initialisation.
    """
    size = items if items is not None else len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))
    forward(batch)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            forward(batch)
        rates.append(size * batches / (time.perf_counter() - start))
    return statistics.median(rates)
