"""Student search for causal LMs: candidates cut from the teacher under a parameter or latency budget.

AutoDistil (Xu et al. 2022, arXiv 2201.12507; METHODS.md section 25) searches students of the teacher's own
family along depth, heads, hidden and MLP width, takes their weights from a trained super-network instead of
training each one, ranks them cheaply and keeps the best under a compute budget. Here the super-network is
the teacher itself: every candidate is a kdforge student section (``from_teacher`` by block importance, then
Minitron's ``prune`` of heads, MLP and hidden channels), so the student it starts from inherits the teacher's
weights, as AutoDistil's sub-networks do, and the chosen row is pasted into a recipe as it is.

This module holds what needs no data: the grid of candidates (:func:`candidate_grid`), their exact
parameter count (a model built on the meta device), their latency measured on this machine (a model of the
candidate's configuration with random weights: latency does not depend on the values), and the budget
(:func:`parse_budget`). :mod:`kdforge.commands` scores the candidates within the budget on the recipe's data.
"""

from __future__ import annotations

import copy
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdforge.errors import KDForgeError
from kdforge.progress import counting_progress

#: fractions of the teacher's size each axis tries (AutoDistil's sub-spaces span similar ranges)
DEPTHS = (1 / 5, 1 / 4, 1 / 3, 1 / 2)
MLP = (1.0, 2 / 3, 1 / 3)
HIDDEN = (1.0, 3 / 4)
HEADS = (1.0, 2 / 3)


@dataclass(frozen=True)
class Budget:
    """At most ``value`` parameters (``kind`` params) or seconds per forward pass (``kind`` latency)."""

    kind: str
    value: float

    def __str__(self) -> str:
        return f"{self.value / 1e6:g}M parameters" if self.kind == "params" else f"{self.value * 1e3:g} ms per forward"


def parse_budget(text: str) -> Budget:
    """``60M``, ``1.2B``, ``500000`` (parameters) or ``40ms``, ``0.5s`` (latency of one forward pass)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(k|K|M|B|G|ms|s)?\s*", text)
    if match is None:
        raise KDForgeError(f"--budget {text}: give parameters (60M, 1.2B, 500000) or a latency (40ms, 0.5s)")
    value, unit = float(match.group(1)), match.group(2) or ""
    if unit in ("ms", "s"):
        return Budget("latency", value / 1e3 if unit == "ms" else value)
    scale = {"": 1, "k": 1e3, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9}[unit]
    return Budget("params", value * scale)


@dataclass
class Candidate:
    """A student of the teacher's family: ``num_layers`` of its blocks and, per block, the widths kept."""

    num_layers: int
    heads: int
    intermediate: int
    hidden: int
    params: int = 0
    latency_s: float | None = None
    scores: dict[str, float] = field(default_factory=dict)

    def label(self) -> str:
        return f"{self.num_layers} layers, {self.heads} heads, MLP {self.intermediate}, hidden {self.hidden}"

    def student_section(self, teacher_config: Any, select: str = "importance") -> dict[str, Any]:
        """The recipe's ``student`` section that builds this candidate (widths equal to the teacher's left out)."""
        section: dict[str, Any] = {"from_teacher": {"num_layers": self.num_layers, "select": select}}
        prune = {
            name: value
            for name, value, full in (
                ("heads", self.heads, teacher_config.num_attention_heads),
                ("intermediate", self.intermediate, teacher_config.intermediate_size),
                ("hidden", self.hidden, teacher_config.hidden_size),
            )
            if value != full
        }
        if prune:
            section["prune"] = prune
        return section

    def config(self, teacher_config: Any) -> Any:
        """The transformers configuration of the candidate (head size kept, as width pruning keeps it)."""
        config = copy.deepcopy(teacher_config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        config.num_hidden_layers, config.num_attention_heads = self.num_layers, self.heads
        config.intermediate_size, config.hidden_size, config.head_dim = self.intermediate, self.hidden, head_dim
        for name in ("layer_types", "sliding_window_pattern"):  # per-layer lists follow the depth
            if isinstance(getattr(config, name, None), list):
                setattr(config, name, getattr(config, name)[: self.num_layers])
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        return config


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def candidate_grid(
    config: Any,
    depths: tuple[float, ...] = DEPTHS,
    mlp: tuple[float, ...] = MLP,
    hidden: tuple[float, ...] = HIDDEN,
    heads: tuple[float, ...] = HEADS,
) -> list[Candidate]:
    """Every combination of the axes' fractions of the teacher's sizes, without duplicates. Depths are at least
    2 blocks; heads stay a multiple of the key/value heads (width pruning keeps them per group); MLP and
    hidden widths are multiples of 64 (of 8 for models narrower than 256), as hardware kernels prefer."""
    layers, total_heads = config.num_hidden_layers, config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or total_heads
    step = 64 if config.hidden_size >= 256 else 8
    found: dict[tuple[int, int, int, int], Candidate] = {}
    for d in depths:
        for m in mlp:
            for h in hidden:
                for a in heads:
                    key = (
                        max(2, min(layers, round(layers * d))),
                        min(total_heads, _round_to(total_heads * a, kv)),
                        min(config.intermediate_size, _round_to(config.intermediate_size * m, step)),
                        min(config.hidden_size, _round_to(config.hidden_size * h, step)),
                    )
                    found.setdefault(key, Candidate(*key))
    return list(found.values())


def count_params(model_class: type, config: Any) -> int:
    """The parameters of ``model_class(config)``, counted on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = model_class(config)
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def measure_latency(model_class: type, config: Any, tokens: int, repeats: int = 5) -> float:
    """Median seconds of one forward pass over ``tokens`` tokens (batch 1, no KV cache, logits of the last
    position, as generation's prefill computes them), for a model of ``config`` with random weights; one
    untimed pass first."""
    model: nn.Module = model_class(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def within_budget(
    candidates: list[Candidate], budget: Budget, model_class: type, teacher_config: Any, tokens: int, repeats: int
) -> list[Candidate]:
    """The candidates that fit ``budget``, each with its parameters and measured latency; largest first.

    With a parameter budget only the candidates that fit are timed."""
    fitting = []
    with counting_progress() as progress:
        bar = progress.add_task(f"sizing and timing candidates ({budget})", total=len(candidates))
        for candidate in candidates:
            progress.advance(bar)
            config = candidate.config(teacher_config)
            candidate.params = count_params(model_class, config)
            if budget.kind == "params" and candidate.params > budget.value:
                continue
            candidate.latency_s = measure_latency(model_class, config, tokens, repeats)
            if budget.kind == "latency" and candidate.latency_s > budget.value:
                continue
            fitting.append(candidate)
    return sorted(fitting, key=lambda c: (-c.params, c.label()))


def spread(candidates: list[Candidate], count: int) -> list[Candidate]:
    """``count`` candidates of the list (largest first), spread evenly over it: the largest always, then
    smaller ones, so the scored set is not only the candidates nearest the budget."""
    if len(candidates) <= count:
        return list(candidates)
    picks = sorted({round(i * (len(candidates) - 1) / max(count - 1, 1)) for i in range(count)})
    return [candidates[i] for i in picks]


def no_candidate_message(budget: Budget, smallest: Candidate | None) -> str:
    hint = ""
    if smallest is not None:
        size = f"{smallest.params / 1e6:.1f}M parameters" if budget.kind == "params" else ""
        if budget.kind == "latency" and smallest.latency_s is not None:
            size = f"{smallest.latency_s * 1e3:.1f} ms"
        hint = f"; the smallest candidate ({smallest.label()}) takes {size}" if size else ""
    return f"--budget: no candidate fits {budget}{hint}; raise the budget"
