"""``kdforge students search``: students of the teacher's family under a budget, scored without full training.

AutoDistil (Xu et al. 2022; METHODS.md section 25) in two stages, for causal LMs, with candidates from
:mod:`kdforge.models.student_search` (depth by block importance, then Minitron width pruning: each candidate
inherits the teacher's weights, as AutoDistil's sub-networks inherit the super-network's):

1. **Without training**: every candidate within the budget (at most ``candidates`` of them, spread from the
   largest down) is built and compared with the teacher on held-out batches: the KL(teacher || candidate)
   of its inherited weights, and DisWOT's sample-relation distance ``d_rel`` of the last hidden states
   (Dong et al. 2023; :func:`kdforge.models.diswot.relation_distance`, over token positions). Ranked by KL.
2. **A short distillation** of the best ``train_best``: a ``kdforge run`` of ``steps`` steps of forward KL on
   the recipe's data (task-agnostic: no labels, no methods), its held-out KL and perplexity read back.

The table (``search.json`` and ``search.md`` in the output folder) gives each candidate's recipe
``student`` section, parameters, latency measured on this machine, and scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import yaml

from kdforge.checks import parse_recipe
from kdforge.commands import build_task
from kdforge.errors import KDForgeError, RecipeError
from kdforge.eval import fidelity
from kdforge.fsutil import atomic_write_text
from kdforge.models.diswot import relation_distance
from kdforge.models.student_search import (
    Budget,
    Candidate,
    candidate_grid,
    count_params,
    no_candidate_message,
    spread,
    within_budget,
)
from kdforge.progress import counting_progress
from kdforge.recipe import Recipe

#: token positions DisWOT's relation matrix compares (a [N, N] Gram per model)
RELATION_TOKENS = 512


def search_recipe(
    recipe: Recipe,
    budget: Budget,
    out: Path,
    *,
    candidates: int = 8,
    train_best: int = 3,
    steps: int = 200,
    eval_batches: int = 4,
    latency_tokens: int = 128,
    latency_repeats: int = 5,
) -> list[dict[str, Any]]:
    """Search students of ``recipe``'s teacher within ``budget``; returns the table's rows, best first, and
    writes ``search.json`` and ``search.md`` to ``out``."""
    if recipe.task != "causal_lm":
        raise RecipeError(
            f"task: students search builds students of a causal LM teacher's family; for the {recipe.task} task,"
            " list candidates in the recipe and rank them with `kdforge students rank`"
        )
    task = build_task(recipe)
    ref = getattr(recipe.teacher, "model", None)
    if ref is None:
        raise RecipeError("teacher.model: the search cuts students from a local teacher model; set teacher.model")
    teacher = task.load_teacher(ref)
    config, model_class = teacher.config, type(teacher)
    grid = candidate_grid(config)
    fitting = within_budget(grid, budget, model_class, config, latency_tokens, latency_repeats)
    if not fitting:
        smallest = min(grid, key=lambda c: c.params or count_params(model_class, c.config(config)))
        raise KDForgeError(no_candidate_message(budget, smallest))
    chosen = spread(fitting, candidates)
    batches = _held_out_batches(task, eval_batches)
    reference = _outputs(task, teacher, batches)
    with counting_progress() as progress:
        bar = progress.add_task("scoring candidates (inherited weights, no training)", total=len(chosen))
        for candidate in chosen:
            student = _task_with(recipe, candidate.student_section(config)).build_student()
            candidate.scores.update(_compare(_outputs(task, student, batches), reference))
            progress.advance(bar)
    chosen.sort(key=lambda c: c.scores["kl_at_start"])
    for i, candidate in enumerate(chosen[:train_best]):
        candidate.scores.update(_distil(recipe, candidate.student_section(config), out, i, steps))
    rows = [_row(c, config) for c in chosen]
    out.mkdir(parents=True, exist_ok=True)
    rows.sort(key=lambda r: (r.get("kl_after") is None, r.get("kl_after") or 0.0, r["kl_at_start"]))
    atomic_write_text(out / "search.json", json.dumps({"budget": str(budget), "steps": steps, "rows": rows}, indent=2))
    atomic_write_text(out / "search.md", markdown(rows, budget, steps))
    return rows


def _task_with(recipe: Recipe, section: dict[str, Any]):
    """The recipe's task with ``section`` as its student (the data splits are the recipe's)."""
    return build_task(recipe.model_copy(update={"student": section}))


def _held_out_batches(task, count: int) -> list[dict[str, Any]]:  # noqa: ANN001 - a Task
    test = task.splits().test
    size = task.recipe.evaluation.batch_size
    total = min(len(test), size * count)
    if total == 0:
        raise RecipeError("data: the test split is empty; nothing to compare the candidates with the teacher on")
    return [task.collate([test[i] for i in range(s, min(s + size, total))]) for s in range(0, total, size)]


@torch.no_grad()
def _outputs(task, model, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:  # noqa: ANN001
    """Per batch: the logits and the last hidden state of the counted positions."""
    model.eval()
    found = []
    for batch in batches:
        out = task.adapter(model, batch, frozenset({"logits", "hidden"}))
        mask = batch["loss_mask"].to(out.logits.device).bool()
        found.append((out.logits[mask].float().cpu(), out.hidden[mask].float().cpu()))
    return found


def _compare(student, teacher) -> dict[str, float]:  # noqa: ANN001 - lists of (logits, hidden)
    logits_s, logits_t = torch.cat([s for s, _ in student]), torch.cat([t for t, _ in teacher])
    hidden_s, hidden_t = torch.cat([h for _, h in student]), torch.cat([h for _, h in teacher])
    picks = torch.randperm(len(hidden_t), generator=torch.Generator().manual_seed(0))[:RELATION_TOKENS]
    agreement = fidelity(logits_t, logits_s)
    return {
        "kl_at_start": agreement["mean_kl"],
        "top1_at_start": agreement["top1_agreement"],
        "d_rel": float(relation_distance(hidden_t[picks], hidden_s[picks])),
    }


def _distil(recipe: Recipe, section: dict[str, Any], out: Path, index: int, steps: int) -> dict[str, float]:
    """A short task-agnostic distillation of one candidate (a ``kdforge run``); its held-out scores."""
    from kdforge.runner import run_recipe

    raw = yaml.safe_load(recipe.to_yaml())
    raw.update(
        name=f"candidate-{index}",
        student=section,
        objective=[{"loss": "forward_kl", "field": "logits", "weight": 1.0}],
        methods=[],
        output={"dir": str(out / "runs"), "overwrite": True},
    )
    raw["training"] = {**raw.get("training", {}), "steps": steps, "checkpoint_every": None}
    raw["evaluation"] = {**raw.get("evaluation", {}), "baseline": False}
    raw["data"] = {**raw["data"], "samples": 0}
    report = run_recipe(parse_recipe(raw))
    student = report["summary"]["student"]
    return {
        "kl_after": student["fidelity"]["mean_kl"]["mean"],
        "top1_after": student["fidelity"]["top1_agreement"]["mean"],
        "perplexity_after": student["metrics"]["perplexity"]["mean"],
    }


def _row(candidate: Candidate, config: Any) -> dict[str, Any]:
    return {
        "candidate": candidate.label(),
        "student": candidate.student_section(config),
        "params": candidate.params,
        "latency_ms": None if candidate.latency_s is None else candidate.latency_s * 1e3,
        **candidate.scores,
    }


def markdown(rows: list[dict[str, Any]], budget: Budget, steps: int) -> str:
    lines = [
        f"Students within {budget}, best first (KL after {steps} steps of distillation, then KL at the start).",
        "",
        "| rank | candidate | parameters | latency (ms) | KL at start | d_rel | KL after | perplexity after |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows, start=1):
        after = "–" if r.get("kl_after") is None else f"{r['kl_after']:.4f}"
        ppl = "–" if r.get("perplexity_after") is None else f"{r['perplexity_after']:.2f}"
        latency = "–" if r["latency_ms"] is None else f"{r['latency_ms']:.1f}"
        lines.append(
            f"| {i} | {r['candidate']} | {r['params'] / 1e6:.2f}M | {latency} | {r['kl_at_start']:.4f}"
            f" | {r['d_rel']:.4f} | {after} | {ppl} |"
        )
    return "\n".join(lines) + "\n"
