"""On-policy distillation (GKD): the student answers the training prompts itself, and the teacher scores it.

Agarwal et al. ("On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes", ICLR 2024) train a causal LM partly on its own sampled answers: with
probability ``lambda`` per optimizer step, the batch's responses are replaced by the
student's answers to the same prompts (sampled without gradient), and the objective
compares student and teacher on those tokens, so the student learns from the mistakes
it makes at generation time rather than only on the file's responses. The other steps
train on the file's responses. A recipe (causal_lm, JSONL prompts)::

    methods: [{name: on_policy, lambda: 0.5, max_new_tokens: 64}]
    objective: [{loss: generalized_jsd, params: {beta: 0.5}}]

The draw is made from ``(training.seed, step)`` alone, so a resumed run, and every
process of a distributed one, decides the same way for the same step. The teacher must
score text written during the run: an online or served teacher, never a cache.

Example, in Python::

    >>> from kdforge.methods.on_policy import on_policy_at
    >>> [on_policy_at(step, lmbda=1.0, seed=0) for step in range(3)]
    [True, True, True]
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from pydantic import ConfigDict, Field
from torch import nn

from kdforge.data.generate import sample_continuations
from kdforge.data.indexed import INDEX_KEY
from kdforge.data.lm import TokenExample, collate_causal
from kdforge.errors import RecipeError
from kdforge.losses.logits import GKD
from kdforge.methods.base import Method, register_method
from kdforge.recipe import Strict
from kdforge.signals import CacheTeacherConfig, teacher_members
from kdforge.tasks.lm_config import records_layout
from kdforge.tasks.lm_generated import derived_seed, prompt_prefixes


class OnPolicySettings(Strict):
    """GKD: how often, and how, the student answers the prompts itself."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    lmbda: float = Field(
        0.5, ge=0, le=1, alias="lambda", description="probability per optimizer step that the student generates"
    )
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0, description="the student's sampling temperature (GKD samples at 1)")
    top_p: float = Field(1.0, gt=0, le=1)


def on_policy_at(step: int, *, lmbda: float, seed: int) -> bool:
    """Whether optimizer step ``step`` trains on the student's own answers: a draw with probability lambda.

    Drawn from (seed, step) alone, so a resumed run, or another process, decides the
    same way for the same step.
    """
    if lmbda <= 0:
        return False
    if lmbda >= 1:
        return True
    return bool(np.random.default_rng([seed, step, 0x6B64]).random() < lmbda)


def student_batch(
    model: nn.Module,
    batch: dict[str, Any],
    cfg: OnPolicySettings,
    *,
    pad_id: int,
    stop_ids: list[int],
    max_length: int,
    seed: int,
    kinds: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The batch's prompts answered by ``model`` (sampled, no gradient), as a batch of the same layout."""
    prompts = prompt_prefixes(batch)
    room = max_length - min(len(p) for p in prompts)
    continuations = sample_continuations(
        model,
        prompts,
        pad_id=pad_id,
        stop_ids=stop_ids,
        max_new_tokens=max(1, min(cfg.max_new_tokens, room)),
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=seed,
    )
    examples = []
    for prompt, continuation in zip(prompts, continuations):
        ids = (prompt + (continuation or [pad_id]))[:max_length]
        counted = torch.zeros(len(ids), dtype=torch.bool)
        counted[len(prompt) :] = True
        examples.append(TokenExample(torch.tensor(ids, dtype=torch.long), counted))
    out = collate_causal(examples, pad_id, kinds)
    if INDEX_KEY in batch:
        out[INDEX_KEY] = batch[INDEX_KEY]
    return out


@register_method
class OnPolicy(Method):
    """With probability lambda per distillation step, the student's own answers to the batch's prompts."""

    name = "on_policy"
    teacher_in_steps_only = True
    summary = (
        "GKD: with probability λ per step the student answers the batch's prompts itself and learns the"
        " teacher's scores of its own answers"
    )
    paper = GKD
    settings = OnPolicySettings
    requires = frozenset({"writes_text"})
    needs_teacher = True
    #: it mixes the student's answers with the file's responses: no method that writes them instead
    excludes = frozenset({"teacher_generated", "online_generation", "step_by_step"})

    @classmethod
    def check(cls, cfg: OnPolicySettings, recipe, where: str) -> None:
        data = recipe.data if isinstance(recipe.data, dict) else {}
        if not records_layout(data):
            raise RecipeError(
                f"{where}: on_policy needs prompts to answer: use data.format: jsonl with a prompt per line,"
                " or a table with a prompt or messages column"
            )
        # the student writes text during the run, which no cache holds: the teacher must run on it
        for path, member in teacher_members(recipe.teacher):
            if isinstance(member, CacheTeacherConfig):
                raise RecipeError(
                    f"{path}.signal: method on_policy ({where}) trains on text written during the run, which no"
                    " cache holds; use signal: online (or served), or the teacher_generated method with the cache"
                )

    def _seed(self) -> int:
        return self.task.recipe.training.seed

    def on_policy_at(self, step: int) -> bool:
        cfg: OnPolicySettings = self.cfg  # type: ignore[assignment]
        return on_policy_at(step, lmbda=cfg.lmbda, seed=self._seed())

    def training_batch(self, model: nn.Module, batch: dict[str, Any], step: int) -> dict[str, Any]:
        """With probability lambda per step, the student's own answers to the batch's prompts."""
        if not self.on_policy_at(step):
            return batch
        task = self.task
        return student_batch(
            model,
            batch,
            self.cfg,  # type: ignore[arg-type]
            pad_id=task.pad_id,
            stop_ids=task.stop_ids(model),
            max_length=task.max_length,
            seed=derived_seed(self._seed(), "on-policy", step),
            kinds=task.kinds,
        )

    def training_info(self, steps: int) -> dict[str, Any]:
        cfg: OnPolicySettings = self.cfg  # type: ignore[assignment]
        return {
            "data_mode": "on_policy",
            "on_policy_steps": sum(self.on_policy_at(s) for s in range(steps)),
            "on_policy_lambda": cfg.lmbda,
        }

    @classmethod
    def report_html(cls, report, render):
        return render(_SECTION)


_SECTION = """{% if train.on_policy_steps is defined %}
<p>Data mode <b>{{ train.data_mode }}</b>: the student answered the prompts itself
 in {{ train.on_policy_steps }} of {{ train.steps }} optimizer steps (lambda {{ train.on_policy_lambda }}).</p>
{% endif %}"""
