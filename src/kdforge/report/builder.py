"""report.json: the runs of one recipe (one per seed), summarised as mean and std."""

from __future__ import annotations

import datetime as dt
import statistics
from pathlib import Path
from typing import Any

from kdforge import __version__
from kdforge.recipe import Recipe

ROLES = ("teacher", "student", "baseline")


def stats(values: list[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": values,
    }


def format_stat(value: dict[str, Any] | float | None, digits: int = 4) -> str:
    """``mean ± std`` of a :func:`stats` summary (just the mean for one run); ``–`` when absent."""
    if value is None or value == {}:
        return "–"
    if isinstance(value, dict):
        if value["n"] > 1:
            return f"{value['mean']:.{digits}f} ± {value['std']:.{digits}f}"
        return f"{value['mean']:.{digits}f}"
    return f"{value:.{digits}f}"


def _collect(runs: list[dict[str, Any]], role: str, section: str) -> dict[str, Any]:
    present = [r["models"][role][section] for r in runs if section in r["models"].get(role, {})]
    if not present:
        return {}
    return {name: stats([p[name] for p in present]) for name in present[0]}


def aggregate(recipe: Recipe, runs: list[dict[str, Any]], primary: str, higher_is_better: bool) -> dict[str, Any]:
    root = recipe.run_dir
    for run in runs:
        run["dir"] = str(Path(run["dir"]).relative_to(root)) if Path(run["dir"]) != root else "."
    summary: dict[str, Any] = {}
    for role in ROLES:
        if not all(role in r["models"] for r in runs):
            continue
        first = runs[0]["models"][role]
        summary[role] = {
            "metrics": _collect(runs, role, "metrics"),
            "fidelity": _collect(runs, role, "fidelity"),
            "params": first["params"],
            "size_bytes": first["size_bytes"],
            "throughput": stats([r["models"][role]["throughput"] for r in runs]),
        }
    report: dict[str, Any] = {
        "format": 1,
        "kdforge_version": __version__,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "name": recipe.name,
        "task": recipe.task,
        "teacher": recipe.teacher_label(),
        "primary_metric": primary,
        "higher_is_better": higher_is_better,
        "seeds": [r["seed"] for r in runs],
        "objective": [
            {"name": n, "loss": t.loss, "field": t.field, "weight": t.weight, "params": t.params}
            for n, t in zip(recipe.term_names(), recipe.objective)
        ],
        "summary": summary,
        "runs": runs,
        "recipe": recipe.model_dump(mode="json"),
    }
    if "student" in summary and "baseline" in summary:
        sign = 1.0 if higher_is_better else -1.0
        deltas = [
            r["models"]["student"]["metrics"][primary] - r["models"]["baseline"]["metrics"][primary] for r in runs
        ]
        report["comparison"] = {
            "metric": primary,
            "student_minus_baseline": stats(deltas),
            "student_better_in": sum(1 for d in deltas if sign * d > 0),
            "ties": sum(1 for d in deltas if d == 0),
            "runs": len(deltas),
        }
    return report
