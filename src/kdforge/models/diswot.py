"""DisWOT: training-free scoring of candidate students for one teacher.

Dong et al., "DisWOT: Student Architecture Search for Distillation WithOut Training",
CVPR 2023 (code: lilujunai/DisWOT-CVPR2023, ``compute_diswot_procedure``). A randomly
initialised candidate is compared with the teacher on **one** labelled batch by two
distances; the score is ``-(d_rel + d_sem)`` and higher is better:

- ``d_rel``, sample relations: how alike the two models' Gram matrices of the batch's
  features are (:func:`relation_distance`);
- ``d_sem``, semantics: how alike the gradients of cross-entropy with respect to each
  model's classifier weights are, class by class (:func:`class_gradient_map`,
  :func:`semantic_distance`).

:func:`rank_candidates` scores a list of student sections of a recipe with any task whose
adapter gives ``hidden`` (the features the classifier head reads, [B, C]) and ``logits``
([B, K]); :func:`kdforge.commands.rank_recipe` does it for a recipe's ``candidates``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn

from kdforge.errors import KDForgeError, RecipeError
from kdforge.outputs import ModelOutputs

if TYPE_CHECKING:
    from kdforge.tasks.base import Task

#: the outputs DisWOT reads from a task's adapter
FIELDS = frozenset({"logits", "hidden"})

Init = Literal["gaussian", "default"]
SemanticForm = Literal["auto", "paper", "classes"]


# ----- the distances ----------------------------------------------------------------


def relation_distance(f_t: torch.Tensor, f_s: torch.Tensor) -> torch.Tensor:
    """Distance between the sample-relation matrices of teacher and student features.

    ``f_t`` is [B, Dt] and ``f_s`` is [B, Ds] (features of the same B examples; the
    widths may differ; more dimensions after B are flattened, as the paper flattens the
    features before global pooling). Each model's Gram matrix ``G = F Fᵀ`` [B, B] has
    its rows L2-normalised, and ``d_rel = ||G_t - G_s||²_F / B²`` (the SP loss of Tung
    & Mori as DisWOT uses it). Scaling either model's features changes nothing.
    Returns a float32 scalar.
    """
    if f_t.shape[0] != f_s.shape[0]:
        raise ValueError(f"teacher and student features cover {f_t.shape[0]} and {f_s.shape[0]} examples")
    batch = f_t.shape[0]
    g_t = _row_normalised_gram(f_t.reshape(batch, -1))
    g_s = _row_normalised_gram(f_s.reshape(batch, -1))
    return (g_t - g_s).pow(2).sum() / batch**2


def class_gradient_map(hidden: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The gradient of mean cross-entropy with respect to a linear head's weight, [K, C].

    ``hidden`` [B, C] is what the head reads, ``logits`` [B, K] what it gives
    (``logits = hidden Wᵀ + b``), ``labels`` [B] class ids. Without a backward pass:
    ``∂CE/∂W = (softmax(logits) - onehot(labels))ᵀ hidden / B``, which is what the paper
    takes from one CE backward of the classifier (its "Grad-CAM-like" class map).
    Computed in float32.
    """
    probs = logits.float().softmax(dim=-1)
    onehot = F.one_hot(labels.long(), num_classes=logits.shape[-1]).float()
    return (probs - onehot).T @ hidden.float() / hidden.shape[0]


def semantic_distance(g_t: torch.Tensor, g_s: torch.Tensor, form: SemanticForm = "auto") -> torch.Tensor:
    """Distance between the class gradient maps of teacher and student.

    ``g_t`` is [K, Ct] and ``g_s`` [K, Cs] (:func:`class_gradient_map`; the same K classes).

    ``form="paper"`` needs Ct == Cs == C: for every class row g the outer product ``g gᵀ``
    [C, C] has its rows L2-normalised, and ``d_sem = Σ_k ||M_t,k - M_s,k||²_F / (K·C)``
    (the ICKD loss over the K classes, as DisWOT's code computes it). Memory K·C².

    ``form="classes"`` works for any widths, where the paper's form is undefined (its
    [C, C] matrices do not line up): it compares the row-normalised K x K Gram of the class
    rows, exactly as :func:`relation_distance` compares samples,
    ``||N(g_t g_tᵀ) - N(g_s g_sᵀ)||²_F / K²``, i.e. whether the two models relate the
    classes alike. This variant is kdforge's, not the paper's, and its values are on
    another scale than the paper's: compare students under one form only.

    ``form="auto"``: the paper's when the widths match, else the classes form.
    """
    if g_t.shape[0] != g_s.shape[0]:
        raise ValueError(f"teacher and student gradient maps have {g_t.shape[0]} and {g_s.shape[0]} classes")
    same_width = g_t.shape[1] == g_s.shape[1]
    if form == "paper" and not same_width:
        raise ValueError(f"the paper's semantic distance needs equal widths, got {g_t.shape[1]} and {g_s.shape[1]}")
    if form == "classes" or not same_width:
        return relation_distance(g_t, g_s)
    classes, width = g_t.shape
    m_t = _row_normalised_outer(g_t.float())
    m_s = _row_normalised_outer(g_s.float())
    return (m_t - m_s).pow(2).sum() / (classes * width)


def _row_normalised_gram(features: torch.Tensor) -> torch.Tensor:
    features = features.float()
    # eps: an all-zero row (e.g. dead ReLU features) stays zero instead of becoming NaN
    return F.normalize(features @ features.T, dim=1)


def _row_normalised_outer(rows: torch.Tensor) -> torch.Tensor:
    """[K, C] -> [K, C, C]: each row's outer product with itself, its rows L2-normalised."""
    return F.normalize(rows.unsqueeze(2) * rows.unsqueeze(1), dim=2)


def diswot_score(
    teacher: ModelOutputs, student: ModelOutputs, labels: torch.Tensor, semantic: SemanticForm = "auto"
) -> dict[str, float]:
    """DisWOT's score of a student for a teacher on one batch: ``score = -(d_rel + d_sem)``.

    Both outputs need ``hidden`` [B, C] (the features the classifier head reads; d_rel
    compares them, and d_sem the head gradients they give) and ``logits`` [B, K];
    ``labels`` is [B]; ``semantic`` is :func:`semantic_distance`'s ``form``. Higher is
    better; a model scored against itself gets 0, the maximum.
    """
    d_rel = relation_distance(teacher.hidden, student.hidden)
    d_sem = semantic_distance(
        class_gradient_map(teacher.hidden, teacher.logits, labels),
        class_gradient_map(student.hidden, student.logits, labels),
        semantic,
    )
    d_rel, d_sem = float(d_rel), float(d_sem)
    return {"score": -(d_rel + d_sem), "d_rel": d_rel, "d_sem": d_sem}


# ----- candidates ---------------------------------------------------------------------


def gaussian_init_(model: nn.Module) -> nn.Module:
    """DisWOT's initialisation of a candidate: linear and conv weights N(0, 1), biases 0,
    normalisation layers weight 1 and bias 0 (the paper scores students at this init)."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.normal_(module.weight, mean=0.0, std=1.0)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def merge_section(base: dict[str, Any], partial: dict[str, Any]) -> dict[str, Any]:
    """``partial`` over ``base``: nested sections merge key by key, any other value replaces."""
    merged = dict(base)
    for key, value in partial.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_section(merged[key], value)
        else:
            merged[key] = value
    return merged


@dataclass
class Ranked:
    """One scored candidate: its student section as given, its size and DisWOT's numbers."""

    candidate: dict[str, Any]
    params: int
    score: float
    d_rel: float
    d_sem: float
    #: the form of d_sem (:func:`semantic_distance`): "paper" or "classes"
    semantic: str


def rank_candidates(
    task: Task,
    teacher_model: nn.Module,
    candidates: list[dict[str, Any]],
    batch: dict[str, Any],
    seed: int,
    init: Init = "gaussian",
) -> list[Ranked]:
    """Score each candidate student against the teacher on ``batch``; best (highest score) first.

    Each candidate is a partial ``student`` section merged over ``task.recipe.student``
    (:func:`merge_section`), validated by the task's ``student_schema`` (errors name
    ``candidates[i].field``) and built by the task with the RNG seeded by ``seed``, so a
    candidate's weights do not depend on its place in the list. ``init="gaussian"`` then
    re-initialises it as the paper does (:func:`gaussian_init_`); ``"default"`` keeps the
    task's own initialisation. The teacher is used as given (trained); the paper's NB201
    script re-initialises the teacher too. Models run in eval mode (no dropout), so a
    score depends only on weights and batch.

    d_sem takes the paper's form when every candidate's features are as wide as the
    teacher's, else kdforge's width-independent form for all of them: the two forms are on
    different scales, and one ranking must use one. Ties keep the candidates' order.
    """
    from accelerate.utils import set_seed

    labels = batch.get("labels")
    if not isinstance(labels, torch.Tensor):
        raise RecipeError(f"candidates: DisWOT needs labelled batches, and task {task.name!r} gives no 'labels'")
    labels = labels.cpu()
    teacher = _outputs(task, teacher_model, batch, "teacher")
    scored = []
    for i, candidate in enumerate(candidates):
        candidate_task = _task_for(task, candidate, i)
        set_seed(seed)
        model = candidate_task.build_student()
        if init == "gaussian":
            gaussian_init_(model)
        params = sum(p.numel() for p in model.parameters())
        scored.append((candidate, params, _outputs(candidate_task, model, batch, f"candidates[{i}]")))
    width = teacher.hidden.shape[1]
    semantic = "paper" if all(out.hidden.shape[1] == width for _, _, out in scored) else "classes"
    rows = [
        Ranked(candidate, params, **diswot_score(teacher, out, labels, semantic), semantic=semantic)
        for candidate, params, out in scored
    ]
    return sorted(rows, key=lambda row: -row.score)


def _task_for(task: Task, candidate: dict[str, Any], index: int) -> Task:
    """A task like ``task`` whose recipe's student section is ``candidate`` merged over it."""
    where = ("candidates", index)
    if not isinstance(candidate, dict):
        raise RecipeError(f"candidates[{index}]: a candidate is a mapping of student fields, got {candidate!r}")
    merged = merge_section(task.recipe.student, candidate)
    try:
        task.student_schema.model_validate(merged)
    except ValidationError as exc:
        from kdforge.recipe import validation_error

        raise validation_error(exc, where) from None
    return type(task)(task.recipe.model_copy(update={"student": merged}))


@torch.no_grad()
def _outputs(task: Task, model: nn.Module, batch: dict[str, Any], who: str) -> ModelOutputs:
    model.eval()
    outputs = task.adapter(model, batch, FIELDS)
    for name in ("hidden", "logits"):
        value = getattr(outputs, name)
        if value is None:
            raise RecipeError(
                f"{who}: task {task.name!r} gives no {name!r} output, and DisWOT compares the features"
                " the classifier reads (hidden, [B, C]) and the logits ([B, K]); it needs a task that gives both"
            )
        if value.dim() != 2:
            raise RecipeError(
                f"{who}: task {task.name!r} gives {name!r} of shape {tuple(value.shape)}; DisWOT needs one"
                f" {'feature vector' if name == 'hidden' else 'logit vector'} per example ([B, C] / [B, K])"
            )
    # on the CPU: a teacher and a candidate may sit on different devices
    return ModelOutputs(hidden=outputs.hidden.float().cpu(), logits=outputs.logits.float().cpu())


# ----- a recipe's candidates --------------------------------------------------------


def sample_batch(task: Task, batch_size: int, seed: int) -> dict[str, Any]:
    """``batch_size`` training examples drawn without replacement with ``seed``, collated."""
    train = task.splits().train
    if batch_size > len(train):
        raise KDForgeError(
            f"--batch-size {batch_size}: the training split has {len(train)} examples; give at most that many"
        )
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    return task.collate([train[int(i)] for i in order[:batch_size]])
