"""Named model outputs shared by teachers and students.

A loss term in a recipe names one of these fields; adapters fill only the fields
the objective asks for, so a run that needs no hidden states never keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

OUTPUT_FIELDS = (
    "logits",
    "hidden",
    "hidden_states",
    "attentions",
    "qkv",
    "values",
    "embeddings",
    "scores",
    "doc_weights",
    "ivf_scores",
)

#: not a field: in the fields an adapter is asked for, it says that ``logits`` may come as
#: :class:`~kdforge.losses.linear.HeadLogits` (the last hidden states and the LM head, the logits
#: not computed) because every loss that reads them takes that form (the fused linear path)
HEAD_LOGITS = "logits:head"


@dataclass
class ModelOutputs:
    #: [B, C] or [B, L, V]; or HeadLogits where the adapter was asked for HEAD_LOGITS and could
    logits: Any = None
    #: one layer's features, [B, H] or [B, L, H], for a loss that compares one tensor
    #: (the task's docstring says which layer)
    hidden: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    qkv: tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], ...] | None = None
    #: one [B, L, D] value projection per layer (MiniLM's value relation)
    values: tuple[torch.Tensor, ...] | None = None
    embeddings: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    #: [B, 1+K, V] a learned sparse retriever's document term weights over the vocabulary (for flops)
    doc_weights: torch.Tensor | None = None
    #: [B, N] a learned index's coarse (IVF centroid) scores of the same candidates as ``scores``
    ivf_scores: torch.Tensor | None = None

    def get(self, name: str):
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"output field {name!r} was not produced; the adapter was not asked for it")
        return value

    def present(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]


def _broken(value) -> bool:
    if isinstance(value, torch.Tensor):
        # -inf is a legal logit or log-prob (a masked token, a zero probability); NaN and +inf are not
        return value.is_floating_point() and bool((torch.isnan(value) | torch.isposinf(value)).any())
    if isinstance(value, (tuple, list)):
        return any(_broken(v) for v in value)
    return False


def nonfinite_fields(outputs: ModelOutputs) -> list[str]:
    """The fields of ``outputs`` holding a NaN or +inf (a broken teacher, an overflowing dtype, a bad cache)."""
    return [f.name for f in fields(outputs) if _broken(getattr(outputs, f.name))]
