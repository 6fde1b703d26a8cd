"""The objective: a weighted sum of registered loss terms, each logged on its own.

Each term names a loss, the output field it compares, a weight and an optional
weight schedule. The objective does not know which task or model produced the
outputs; it only routes fields (and labels, for label losses) to loss functions.

A term may name a learnable loss module (MI-alpha's critic, DAC-KL's clipping
network) instead of a function: the objective builds it once from the term's params
and owns it; :meth:`Objective.loss_modules` hands the modules to whoever trains them.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kdforge.distributed import current_share, gather_rows, global_mean, local_only, mean_over_processes
from kdforge.errors import RecipeError, first_line
from kdforge.losses import LossSpec
from kdforge.losses.registry import MODULE_PARAM_ERRORS, LossModuleSpec, SizeMismatch, TermState, find_term_loss
from kdforge.outputs import ModelOutputs
from kdforge.recipe import ObjectiveTerm, TermSchedule


def schedule_factor(schedule: TermSchedule | None, step: int, total_steps: int) -> float:
    """Weight multiplier at ``step``: ``start`` -> ``end`` over ``schedule.steps`` (default: the run)."""
    if schedule is None:
        return 1.0
    span = schedule.steps or total_steps
    progress = min(max(step / max(span, 1), 0.0), 1.0)
    if schedule.shape == "constant":
        return schedule.start
    if schedule.shape == "cosine":
        progress = 0.5 * (1 - math.cos(math.pi * progress))
    elif schedule.shape == "quadratic":  # the FLOPS-weight warm-up of SPLADE and its successors
        progress = progress**2
    return schedule.start + (schedule.end - schedule.start) * progress


def term_temperature(term: ObjectiveTerm) -> float:
    """The temperature a term's loss divides logits by: its ``temperature`` param, the loss's default, or 1.

    Raises TypeError or ValueError when the param is not a number (recipe params are free-form)."""
    if "temperature" in term.params:
        return float(term.params["temperature"])
    spec = find_term_loss(term.loss, field="objective")
    fn = spec.fn if hasattr(spec, "fn") else spec.cls.forward
    parameter = inspect.signature(fn).parameters.get("temperature")
    if parameter is not None and parameter.default is not inspect.Parameter.empty:
        return float(parameter.default)
    return 1.0


def teacher_fields_of(terms: list[ObjectiveTerm]) -> frozenset[str]:
    """The output fields the terms compare with the teacher (what a teacher signal must give)."""
    return frozenset(
        t.field for i, t in enumerate(terms) if find_term_loss(t.loss, field=f"objective[{i}].loss").target == "teacher"
    )


@dataclass
class BoundTerm:
    """A recipe term tied to its loss (a function, or the term's own module), its parameters and state."""

    name: str
    index: int
    spec: LossSpec | LossModuleSpec
    term: ObjectiveTerm
    fn: Callable[..., torch.Tensor]
    loss_params: dict[str, Any] = field(default_factory=dict)
    state: TermState | None = None
    module: nn.Module | None = None
    # the optimizer step whose loss values are being summed, and that sum, for state.update
    pending_step: int | None = None
    pending: list[float] = field(default_factory=list)

    @classmethod
    def build(cls, name: str, index: int, term: ObjectiveTerm, total_steps: int) -> BoundTerm:
        spec = find_term_loss(term.loss, field=f"objective[{index}].loss")
        if isinstance(spec, LossModuleSpec):
            init, params = spec.split_params(term.params)
            try:
                module = spec.cls(**init)
            except MODULE_PARAM_ERRORS as exc:
                raise RecipeError(f"objective[{index}].params: {first_line(exc)}") from None
            return cls(name, index, spec, term, module, params, module=module)
        state_keys = spec.state_param_names()
        state = None
        if spec.state is not None:
            try:
                state = spec.state(total_steps=total_steps, **{k: v for k, v in term.params.items() if k in state_keys})
            except (ValueError, TypeError) as exc:
                raise RecipeError(f"objective[{index}].params: {exc}") from None
        params = {k: v for k, v in term.params.items() if k not in state_keys}
        return cls(name, index, spec, term, spec.fn, params, state)

    @property
    def location(self) -> str:
        """The term's path in the recipe, which is also its module's key."""
        return f"objective[{self.index}]"

    def begin(self, step: int) -> None:
        """Before a step's first loss: feed the state the previous step's mean loss."""
        if self.state is not None and step != self.pending_step and self.pending:
            self.state.update(sum(self.pending) / len(self.pending))
            self.pending = []

    def observe(self, step: int, value: float) -> None:
        """Collect this step's loss values (one per micro-batch)."""
        self.pending_step = step
        self.pending.append(value)


class Objective:
    """``objective(student_out, teacher_out, batch, step) -> (loss, {term name: value})``."""

    def __init__(self, terms: list[ObjectiveTerm], total_steps: int, names: list[str] | None = None, *, seed: int = 0):
        if not terms:
            raise RecipeError("objective: needs at least one term")
        names = names or [t.name or t.loss for t in terms]
        # Loss modules start from ``seed`` whatever ran before, and leave the global RNG
        # as it was: adding a learnable term does not change the student's initialisation.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.terms = [BoundTerm.build(name, i, t, total_steps) for i, (name, t) in enumerate(zip(names, terms))]
        self.total_steps = total_steps
        self._modules = nn.ModuleDict({t.location: t.module for t in self.terms if t.module is not None})

    def loss_modules(self) -> nn.ModuleDict:
        """The terms' learnable loss modules, keyed ``objective[i]``; empty when no term has one.

        The objective calls these very modules, so moving them to a device or loading
        weights into them (as the engine does) is seen by the next call.
        """
        return self._modules

    def parameters(self) -> list[nn.Parameter]:
        """The learnable parameters of the loss terms, to be optimised with the student's."""
        return [p for p in self._modules.parameters() if p.requires_grad]

    @property
    def student_fields(self) -> frozenset[str]:
        return frozenset(t.term.field for t in self.terms)

    @property
    def teacher_fields(self) -> frozenset[str]:
        return frozenset(t.term.field for t in self.terms if t.spec.target == "teacher")

    @property
    def head_logits(self) -> bool:
        """Whether every term on ``logits`` takes them as the last hidden states and the LM head
        (:class:`~kdforge.losses.linear.HeadLogits`: the fused linear path) and one term at least reads them."""
        on_logits = [t for t in self.terms if t.term.field == "logits"]
        return bool(on_logits) and all(
            isinstance(t.spec, LossSpec) and t.spec.linear and t.term.layer is None for t in on_logits
        )

    @property
    def needs_teacher(self) -> bool:
        return bool(self.teacher_fields)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.terms]

    def weights_at(self, step: int) -> dict[str, float]:
        return {t.name: t.term.weight * schedule_factor(t.term.schedule, step, self.total_steps) for t in self.terms}

    def __call__(
        self,
        student: ModelOutputs,
        teacher: ModelOutputs | None,
        batch: dict[str, Any],
        step: int,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        weights = self.weights_at(step)
        total: torch.Tensor | None = None
        values: dict[str, torch.Tensor] = {}
        for bound in self.terms:
            term = bound.term
            if bound.spec.target == "labels":
                target = batch["labels"]
            elif bound.spec.target == "none":
                target = None
            else:
                assert teacher is not None, "the engine runs the teacher when a term needs it"
                target = teacher.get(term.field)
            extra = {"labels": batch["labels"]} if bound.spec.needs_labels else {}
            bound.begin(step)
            if bound.state is not None:
                extra.update(bound.state.loss_params())
            prediction = _pick_layer(bound, student.get(term.field), term.layer, "student")
            if target is not None and bound.spec.target == "teacher":
                layer = term.layer if term.teacher_layer is None else term.teacher_layer
                target = _pick_layer(bound, target, layer, "teacher")
            mask = _term_mask(bound, batch)
            if bound.module is not None:
                _check_tensors(bound, prediction, target)
            try:
                value = _term_value(bound, prediction, target, mask, extra)
            except SizeMismatch as exc:
                raise RecipeError(
                    f"{bound.location}.params.{exc.param}: {term.loss!r} was built for {exc.param}={exc.expected},"
                    f" but the {exc.side}'s {term.field!r} has size {exc.actual}; set {exc.param}: {exc.actual}"
                ) from None
            except (ValueError, TypeError) as exc:
                if term.mask is not None and "mask" in str(exc):  # the recipe chose the mask: name it, and the fix
                    raise RecipeError(
                        f"{bound.location}.mask: {term.mask!r} does not line up with the term's {term.field!r}"
                        f" ({exc}); leave mask unset for the task's default, or choose another of"
                        f" {', '.join(_offered_masks(batch)) or 'none'}"
                    ) from None
                raise RecipeError(f"objective[{bound.index}] ({term.loss}): {exc}") from None
            values[bound.name] = value.detach()
            if bound.state is not None:  # every process's state follows the global batch's value
                bound.observe(step, float(mean_over_processes(value) if current_share() else value.detach()))
            contribution = weights[bound.name] * value
            total = contribution if total is None else total + contribution
        assert total is not None
        return total, values

    def scalars(self) -> dict[str, float]:
        """Values of the terms' states worth logging (e.g. TAID's t), by ``term/param``."""
        out = {}
        for t in self.terms:
            if t.state is not None:
                out.update({f"{t.name}/{k}": float(v) for k, v in t.state.loss_params().items()})
        return out

    # Term states (TAID's t, adaptive temperatures) are checkpointed through these, as JSON.
    # Loss modules' weights are tensors: they are checkpointed with the model's, through
    # loss_modules(), in safetensors.
    def state_dict(self) -> dict[str, Any]:
        return {
            t.name: {"state": t.state.state_dict(), "pending_step": t.pending_step, "pending": list(t.pending)}
            for t in self.terms
            if t.state is not None
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for t in self.terms:
            if t.state is not None and t.name in state:
                saved = state[t.name]
                t.state.load_state_dict(saved["state"])
                t.pending_step, t.pending = saved["pending_step"], list(saved["pending"])


def _term_value(
    bound: BoundTerm, prediction: Any, target: Any, mask: torch.Tensor | None, extra: dict[str, Any]
) -> torch.Tensor:
    """The term's loss; on several processes, this process's share of the global batch's value
    (:mod:`kdforge.distributed`)."""
    share = current_share()
    if share is None:
        return bound.fn(prediction, target, mask=mask, **extra, **bound.loss_params)
    if bound.spec.couples_batch:  # every process computes the value on the whole batch's rows
        where = f"{bound.location} ({bound.term.loss})"
        prediction, target, mask = (
            gather_rows(x, counted=share.counted, where=where) for x in (prediction, target, mask)
        )
        if "labels" in extra:
            extra = {**extra, "labels": gather_rows(extra["labels"], counted=share.counted, where=where)}
        with local_only():
            return bound.fn(prediction, target, mask=mask, **extra, **bound.loss_params)
    before = share.reductions
    value = bound.fn(prediction, target, mask=mask, **extra, **bound.loss_params)
    if share.reductions == before:  # a loss that reduced on its own is taken as a mean over its rows
        rows = prediction.shape[0] if isinstance(prediction, torch.Tensor) and prediction.dim() else 1
        value = global_mean(value * rows, value.new_tensor(float(rows)))
    return value


#: batch key of a task's default mask per output field (``{"attentions": "token_mask"}``): a
#: term on a token-level field counts real tokens without the recipe naming the mask
FIELD_MASKS = "field_masks"


def _term_mask(bound: BoundTerm, batch: dict[str, Any]) -> torch.Tensor | None:
    """The mask the term names; by default the task's mask for the term's field, else ``loss_mask``
    (a batch without masks counts everything)."""
    name = bound.term.mask or batch.get(FIELD_MASKS, {}).get(bound.term.field) or "loss_mask"
    offered = _offered_masks(batch)
    if bound.term.mask is not None and name in batch and not name.endswith("_mask"):
        # labels or inputs would be taken for a mask (nonzero = counted) and silently drop rows
        raise RecipeError(
            f"{bound.location}.mask: {name!r} is not a mask; this task's batches offer {', '.join(offered) or 'none'}"
        )
    if name in batch:
        return batch[name]
    if name == "loss_mask":
        return None
    raise RecipeError(
        f"{bound.location}.mask: the batch has no {name!r}; this task's batches offer"
        f" {', '.join(offered) or 'no named masks'}"
    )


def _offered_masks(batch: dict[str, Any]) -> list[str]:
    """The batch's masks of positions a term may count (attention_mask is the model's input mask)."""
    return sorted(k for k in batch if k.endswith("_mask") and k != "attention_mask")


def _pick_layer(bound: BoundTerm, value: Any, layer: int | None, side: str) -> Any:
    """One layer of a per-layer field (a tuple with one entry per layer), when the term names one."""
    if layer is None:
        return value
    key = "layer" if side == "student" or bound.term.teacher_layer is None else "teacher_layer"
    if not isinstance(value, tuple):
        raise RecipeError(
            f"{bound.location}.{key}: the {side}'s {bound.term.field!r} is one tensor, not one per layer;"
            " remove the layer setting"
        )
    if not -len(value) <= layer < len(value):
        raise RecipeError(
            f"{bound.location}.{key}: layer {layer} does not exist; the {side}'s {bound.term.field!r} has"
            f" {len(value)} layers (0 to {len(value) - 1}, or -1 for the last)"
        )
    return value[layer]


def _check_tensors(bound: BoundTerm, *values: Any) -> None:
    """Loss modules compare one tensor per side; a tuple field (every layer) needs a loss that picks one."""
    for side, value in zip(("student", "teacher"), values):
        if side == "teacher" and bound.term.field == "logits" and isinstance(value, tuple) and len(value) == 2:
            raise RecipeError(
                f"{bound.location}.loss: {bound.term.loss!r} needs the teacher's full logits, but the teacher"
                " signal gives its top-k only (a cache or a server); use signal: online for this run"
            )
        if value is not None and not isinstance(value, torch.Tensor):
            raise RecipeError(
                f"{bound.location}.field: {bound.term.loss!r} compares one tensor, but the {side}'s"
                f" {bound.term.field!r} is a {type(value).__name__}; choose a field that holds one tensor"
            )
