"""Several teachers as one: weighted, per output field, whatever kind each member is.

* ``logits``: the mixture of the members' distributions, sum_i w_i p_i (averaged as
  probabilities, never as logits or log-probs), returned as log-probabilities. When a
  member gives a top-k pair (a cache, a served teacher) the mixture is top-k too:
  the candidates are the union of the members' tokens; a dense member contributes
  its exact probability of each candidate, a top-k member its stored one or 0 for a
  token outside its top-k (that mass stays in its tail); the result keeps the k most
  probable candidates (k = the largest member k) and the losses see the rest as tail.
* ``scores`` (ranking, ``[B, K]``): each member's scores min-max normalised per query
  (per row, as the inference-free sparse retriever paper does before averaging
  BM25 and dense scores), then averaged with the weights.
* ``embeddings`` and other tensors: the weighted mean (shapes must agree).

Weights are normalised to sum to 1.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, PlainValidator, ValidationInfo, field_validator

from kdforge.outputs import ModelOutputs
from kdforge.signals.base import (
    SIGNALS,
    Batch,
    BuiltSignal,
    SignalConfig,
    TeacherSignal,
    build_signal,
    teacher_config,
    teacher_members,
)

TopK = tuple[torch.Tensor, torch.Tensor]


def mix_dense_logits(logits: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """log sum_i w_i softmax(z_i), computed in log space."""
    stacked = torch.stack([torch.log_softmax(z.float(), -1) + math.log(w) for z, w in zip(logits, weights) if w > 0])
    return torch.logsumexp(stacked, dim=0)


def _probability_at(member: torch.Tensor | TopK, candidates: torch.Tensor) -> torch.Tensor:
    """A member's probability of each candidate token ([..., n]); 0 outside a top-k member's tokens."""
    if isinstance(member, tuple):
        ids, log_p = member
        hit = candidates.unsqueeze(-1) == ids.unsqueeze(-2)  # [..., n, k]
        return (hit * log_p.float().exp().unsqueeze(-2)).sum(-1)
    return torch.softmax(member.float(), -1).gather(-1, candidates)


def mix_topk(members: list[torch.Tensor | TopK], weights: list[float]) -> TopK:
    """The mixture over the union of the members' top-k tokens, as ``(ids, log_probs)`` of the largest k."""
    k = max(m[0].shape[-1] for m in members if isinstance(m, tuple))
    candidates = torch.cat(
        [m[0] if isinstance(m, tuple) else m.float().topk(min(k, m.shape[-1]), -1).indices for m in members], -1
    )
    mixed = sum(w * _probability_at(m, candidates) for m, w in zip(members, weights))
    # a token proposed by several members appears several times: keep its first copy
    sorted_ids, order = torch.sort(candidates, dim=-1, stable=True)
    repeat = torch.zeros_like(sorted_ids, dtype=torch.bool)
    repeat[..., 1:] = sorted_ids[..., 1:] == sorted_ids[..., :-1]
    duplicate = torch.zeros_like(repeat).scatter(-1, order, repeat)
    mixed = mixed.masked_fill(duplicate, -1.0)
    values, index = mixed.topk(min(k, candidates.shape[-1]), -1)
    return candidates.gather(-1, index), values.clamp_min(1e-30).log()


def minmax_per_query(scores: torch.Tensor) -> torch.Tensor:
    """Scores rescaled to [0, 1] along the last axis (a constant row becomes 0)."""
    low = scores.amin(-1, keepdim=True)
    span = scores.amax(-1, keepdim=True) - low
    return (scores - low) / span.clamp_min(1e-12)


def combine(field: str, values: list, weights: list[float]):
    if field == "logits":
        if any(isinstance(v, tuple) for v in values):
            return mix_topk(values, weights)
        return mix_dense_logits(values, weights)
    if any(isinstance(v, tuple) for v in values):
        raise ValueError(f"ensemble: cannot combine {field} made of several tensors")
    if field == "scores":
        return sum(w * minmax_per_query(v.float()) for v, w in zip(values, weights))
    shapes = {tuple(v.shape) for v in values}
    if len(shapes) > 1:
        raise ValueError(f"ensemble: members give {field} of shapes {sorted(shapes)}; they must agree")
    return sum(w * v.float() for v, w in zip(values, weights))


def _member(value: Any) -> SignalConfig:
    return teacher_config(value, member=True)


class EnsembleTeacherConfig(SignalConfig):
    """Several teachers of any kind, weighted (equal weights by default)."""

    signal: Literal["ensemble"]
    #: each member's section is validated by the schema of the signal it names (any but an ensemble)
    members: list[Annotated[Any, PlainValidator(_member)]] = Field(min_length=1)
    weights: list[float] | None = None

    @field_validator("weights")
    @classmethod
    def _weights_fit(cls, weights: list[float] | None, info: ValidationInfo) -> list[float] | None:
        members = info.data.get("members")
        if weights is not None and members is not None:
            if len(weights) != len(members):
                raise ValueError(f"{len(weights)} weights for {len(members)} members")
            if any(w < 0 for w in weights) or sum(weights) <= 0:
                raise ValueError("weights must be >= 0 and not all 0")
        return weights

    def label(self) -> str:
        return "ensemble of " + ", ".join(member.label() for _, member in teacher_members(self))

    def teachers(self, where: str) -> list[tuple[str, SignalConfig]]:
        return [(f"{where}.members[{i}]", member) for i, member in enumerate(self.members)]


@SIGNALS.register("ensemble")
class EnsembleTeacher(TeacherSignal):
    config = EnsembleTeacherConfig
    ensemble_member = False

    @classmethod
    def from_config(
        cls, task, cfg: EnsembleTeacherConfig, teacher_fields: frozenset[str], where: str = "teacher"
    ) -> BuiltSignal:
        members = [build_signal(task, member, teacher_fields, path) for path, member in teacher_members(cfg, where)]
        ensemble = cls([m.signal for m in members], cfg.weights)
        info = {"signal": "ensemble", "weights": ensemble.weights, "members": [m.info for m in members]}
        return BuiltSignal(ensemble, info=info)

    def __init__(self, members: list[TeacherSignal], weights: list[float] | None = None):
        if not members:
            raise ValueError("an ensemble needs at least one member")
        weights = list(weights) if weights is not None else [1.0] * len(members)
        if len(weights) != len(members) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"ensemble weights {weights} must be {len(members)} non-negative numbers, not all 0")
        total = sum(weights)
        self.members = members
        self.weights = [w / total for w in weights]

    def outputs(self, batch: Batch, fields: frozenset[str]) -> ModelOutputs:
        answers = [m.outputs(batch, fields) for m in self.members]
        return ModelOutputs(**{f: combine(f, [a.get(f) for a in answers], self.weights) for f in fields})
