"""Ground-truth mixing: the distillation target is the teacher's distribution mixed with the label.

Borup and Andersen ("Even your Teacher Needs Guidance", NeurIPS 2021) show that in
self-distillation the teacher's targets alone amplify regularisation step after step
until the fit collapses, and that a share of the ground truth in the target dampens it.
The target of every teacher term on ``logits`` becomes

    p_target = (1 - gamma) * softmax(z_teacher / T) + gamma * onehot(y)

with ``gamma`` constant or scheduled (``schedule: {shape: linear, start: 0.5, end: 0.1}``),
handed to the losses as the logits ``T * log(p_target)``, so that a loss that divides by
the same temperature ``T`` recovers exactly ``p_target``. A recipe::

    methods: [{name: ground_truth_mixing, gamma: 0.3}]
    objective: [{loss: hinton_kd, params: {temperature: 1}}]

The method needs labels in the batch and the teacher's full logits (not a cache's or a
server's top-k), and every teacher term on ``logits`` must use ``temperature``.

Example, in Python::

    >>> import torch
    >>> from kdforge.methods.ground_truth_mixing import mixed_target_logits
    >>> logits = mixed_target_logits(torch.tensor([[2.0, 0.0]]), torch.tensor([1]), gamma=0.5)
    >>> torch.softmax(logits, -1)  # half the teacher's (0.88, 0.12), half the label (0, 1)
    tensor([[0.4404, 0.5596]])
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from pydantic import Field, model_validator

from kdforge.errors import RecipeError
from kdforge.losses.registry import find_term_loss
from kdforge.methods.base import Method, register_method
from kdforge.objective import schedule_factor, term_temperature
from kdforge.outputs import ModelOutputs
from kdforge.provenance import Paper
from kdforge.recipe import Strict, TermSchedule


class GroundTruthMixingSettings(Strict):
    gamma: float = Field(0.5, ge=0, le=1, description="the label's share of the target (constant, without schedule)")
    schedule: TermSchedule | None = Field(
        None,
        description="gamma over the run instead: start -> end over schedule.steps (default: training.steps),"
        " e.g. {shape: linear, start: 0.5, end: 0.1}",
    )
    temperature: float = Field(1.0, gt=0, description="the temperature of the mixed teacher distribution")

    @model_validator(mode="after")
    def _shares(self) -> GroundTruthMixingSettings:
        if self.schedule is not None and max(self.schedule.start, self.schedule.end) > 1:
            raise ValueError("schedule.start and schedule.end are gamma values: give them in [0, 1]")
        return self


def mixed_target_logits(
    teacher_logits: torch.Tensor, labels: torch.Tensor, *, gamma: float, temperature: float = 1.0
) -> torch.Tensor:
    """``T * log((1 - gamma) softmax(z / T) + gamma onehot(y))``: logits whose softmax at ``T`` is the mix.

    ``teacher_logits`` [B, C], ``labels`` [B] class ids. A zero probability (gamma 1 off the label) is
    kept at the dtype's smallest normal number, so that losses taking p log p stay finite.
    """
    probs = torch.softmax(teacher_logits.float() / temperature, dim=-1)
    onehot = torch.nn.functional.one_hot(labels.long(), probs.shape[-1]).to(probs.dtype)
    mixed = (1.0 - gamma) * probs + gamma * onehot
    return (temperature * mixed.clamp_min(torch.finfo(mixed.dtype).tiny).log()).to(teacher_logits.dtype)


@register_method
class GroundTruthMixing(Method):
    """The target of the teacher's logit terms mixes the teacher's distribution with the one-hot label."""

    name = "ground_truth_mixing"
    teacher_in_steps_only = True
    summary = (
        "Mix the one-hot label into the teacher's target distribution, (1-γ)·p_teacher + γ·y, γ fixed or scheduled"
    )
    paper = Paper(
        "Even your Teacher Needs Guidance: Ground-Truth Targets Dampen Regularization Imposed by Self-Distillation",
        2021,
        "2102.13088",
    )
    settings = GroundTruthMixingSettings
    requires = frozenset({"has_labels", "gives_logits"})
    needs_teacher = True

    @classmethod
    def check(cls, cfg: GroundTruthMixingSettings, recipe, where: str) -> None:
        terms = [(i, t) for i, t in enumerate(recipe.objective) if t.field == "logits" and _compares_teacher(t.loss)]
        if not terms:
            raise RecipeError(
                f"{where}: ground-truth mixing changes the teacher's logits; add a teacher term on logits"
            )
        for i, term in terms:
            used = term_temperature(term)
            if used != cfg.temperature:
                raise RecipeError(
                    f"objective[{i}].params.temperature: {used:g}, but {where} mixes the teacher's distribution at"
                    f" temperature {cfg.temperature:g}; set them equal"
                )
        if cfg.schedule is not None and cfg.schedule.steps is None and recipe.training.steps is None:
            raise RecipeError(f"{where}.schedule.steps: give the schedule's length when training.epochs sets the run's")

    def gamma_at(self, step: int) -> float:
        cfg: GroundTruthMixingSettings = self.cfg  # type: ignore[assignment]
        if cfg.schedule is None:
            return cfg.gamma
        return schedule_factor(cfg.schedule, step, cfg.schedule.steps or self.task.recipe.training.steps or 1)

    def teacher_outputs(self, batch: dict[str, Any], outputs: ModelOutputs, step: int) -> ModelOutputs:
        if outputs.logits is None:
            return outputs
        if not isinstance(outputs.logits, torch.Tensor):
            raise RecipeError(
                f"{self.where}: ground-truth mixing needs the teacher's full logits, and this teacher gives top-k"
                " log-probs (a cache or a server); use an online teacher"
            )
        cfg: GroundTruthMixingSettings = self.cfg  # type: ignore[assignment]
        mixed = mixed_target_logits(
            outputs.logits, batch["labels"].to(outputs.logits.device), gamma=self.gamma_at(step),
            temperature=cfg.temperature,
        )  # fmt: skip
        return replace(outputs, logits=mixed)

    def training_info(self, steps: int) -> dict[str, Any]:
        return {"ground_truth_mixing": {"gamma_first": self.gamma_at(0), "gamma_last": self.gamma_at(steps)}}

    @classmethod
    def report_html(cls, report, render):
        return render(_SECTION)


def _compares_teacher(loss: str) -> bool:
    return find_term_loss(loss, field="objective").target == "teacher"


_SECTION = """{% set g = train.ground_truth_mixing %}{% if g %}
<p>Ground-truth mixing: the teacher's logit terms learned (1 − γ)·p<sub>teacher</sub> + γ·one-hot(label), with γ
 {% if g.gamma_first == g.gamma_last %}{{ g.gamma_first }}{% else %}from {{ "%.3f" | format(g.gamma_first) }}
 to {{ "%.3f" | format(g.gamma_last) }}{% endif %} (Borup and Andersen, 2021).</p>
{% endif %}"""
