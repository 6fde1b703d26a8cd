"""The model card (README.md) saved next to a trained student."""

from __future__ import annotations

from typing import Any

from kdforge.recipe import Recipe


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def render(recipe: Recipe, models: dict[str, Any], *, role: str, load_hint: str, library: str = "kdforge") -> str:
    teacher = recipe.teacher_label()
    what = "student"
    if role == "baseline":
        untrained = models.get("baseline", {}).get("train", {}).get("untrained")
        what = (
            "no-distillation baseline ("
            + ("the student as initialised, untrained" if untrained else "labels only")
            + ")"
        )
    lines = [
        "---",
        f"library_name: {library}",
        "tags: [knowledge-distillation, kdforge" + (f", {recipe.task}" if recipe.task else "") + "]",
        "---",
        f"# {recipe.name}: {what}",
        "",
    ]
    if teacher and role == "student":
        lines.append(f"Distilled with kdforge from the teacher `{teacher}` on the `{recipe.task}` task.")
    elif teacher:
        lines.append(f"Trained with kdforge on labels only, as the baseline for distilling `{teacher}`.")
    else:
        lines.append(f"Trained with kdforge on labels only (`{recipe.task}` task); no teacher.")
    lines += ["", "## Data", "", "```yaml", _yaml(recipe.data), "```", "", "## Objective", ""]
    lines += ["| term | loss | field | weight | params |", "|---|---|---|---|---|"]
    for name, term in zip(recipe.term_names(), recipe.objective):
        lines.append(f"| {name} | {term.loss} | {term.field} | {term.weight} | {term.params or ''} |")
    roles = [r for r in ("teacher", "student", "baseline") if r in models]
    metric_names = list(models[role]["metrics"])
    lines += ["", "## Results on the test split", "", "| model | " + " | ".join(metric_names) + " | parameters |"]
    lines.append("|---" * (len(metric_names) + 2) + "|")
    for r in roles:
        m = models[r]
        lines.append(
            f"| {r} | " + " | ".join(_fmt(m["metrics"].get(k)) for k in metric_names) + f" | {m['params']:,} |"
        )
    if "fidelity" in models[role]:
        fid = models[role]["fidelity"]
        lines += [
            "",
            f"Fidelity to the teacher: top-1 agreement {fid['top1_agreement']:.4f}, mean KL {fid['mean_kl']:.4f}.",
        ]
    lines += ["", "## Recipe", "", "```yaml", recipe.to_yaml().rstrip(), "```", ""]
    lines += [
        "## Load",
        "",
        "```python",
        load_hint.format(folder="path/to/this/folder"),
        "```",
        "",
    ]
    return "\n".join(lines)


def _yaml(section: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(section, sort_keys=False).rstrip()
