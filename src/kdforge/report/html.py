"""report.html: one self-contained page (plots embedded) from report.json and the metrics logs."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import yaml
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from kdforge.engine.metrics_log import read_metrics
from kdforge.errors import RunDirError
from kdforge.fsutil import atomic_write_text
from kdforge.report import plots
from kdforge.report.builder import format_stat


def _data_uri(png: bytes | None) -> str | None:
    return "data:image/png;base64," + base64.b64encode(png).decode() if png else None


def load_report(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        raise RunDirError(f"{run_dir}: no report.json; is this a finished kdforge run folder?")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise RunDirError(f"{path}: not valid JSON; run the recipe again to rewrite it") from None


def write_report(run_dir: Path) -> Path:
    run_dir = Path(run_dir)
    report = load_report(run_dir)
    curves: dict[str, list] = {"student": [], "baseline": []}
    evals: dict[str, list] = {"student": [], "baseline": []}
    for i, run in enumerate(report["runs"]):
        records = read_metrics(run_dir / run["dir"] / "metrics.jsonl")
        for phase in curves:
            curves[phase].append([r for r in records if r.get("phase") == phase and "loss" in r])
            if i == 0:
                evals[phase] = [r for r in records if r.get("phase") == phase and "eval" in r]
    summary = report["summary"]
    figures = [
        (
            "Training loss per term",
            _data_uri(plots.loss_curves(curves)) if any(any(c) for c in curves.values()) else None,
        ),
        (
            "Task metrics on the test split",
            _data_uri(plots.metric_bars(summary, "metrics", "task metrics (mean ± std over seeds)")),
        ),
        (
            "Fidelity to the teacher",
            _data_uri(plots.metric_bars(summary, "fidelity", "fidelity (top-1 agreement, mean KL)")),
        ),
        ("Speed and size", _data_uri(plots.speed_size(summary, report.get("throughput_unit") or "examples/s"))),
        ("Periodic evaluation (first seed)", _data_uri(plots.eval_curves(evals))),
        (
            "Term schedules, e.g. TAID's interpolation t (first seed)",
            _data_uri(plots.scalar_curves(curves["student"][0])) if curves["student"] else None,
        ),
    ]
    selection = report["runs"][0]["models"].get("student", {}).get("train", {}).get("layer_selection")
    if selection:
        title = "The teacher's layers the student kept (first seed)"
        figures.append((title, _data_uri(plots.layer_selection(selection))))
    if "comparison" in report and len(report["runs"]) > 1:
        figures.append(
            (
                "Distilled student vs baseline, per seed",
                _data_uri(plots.seed_pairs(report["runs"], report["primary_metric"])),
            )
        )
    env = Environment(loader=PackageLoader("kdforge", "report/templates"), autoescape=select_autoescape())
    env.filters["fmt"] = format_stat
    sections = []
    for cls, entry in _methods_of(report):  # each method renders its own section and figures
        first = report["runs"][0]["models"].get("student", {})
        context = {"report": report, "summary": summary, "train": first.get("train", {}), "settings": entry}
        html = cls.report_html(report, lambda template, c=context: env.from_string(template).render(**c))
        if html.strip():
            sections.append(Markup(html))
        figures += [(title, _data_uri(png)) for title, png in cls.report_figures(report, run_dir)]
    html = env.get_template("report.html").render(
        report=report,
        summary=summary,
        roles=[r for r in ("teacher", "student", "baseline") if r in summary],
        figures=[(title, uri) for title, uri in figures if uri],
        method_sections=sections,
        recipe_yaml=yaml.safe_dump(report["recipe"], sort_keys=False),
    )
    return atomic_write_text(run_dir / "report.html", html)


def _methods_of(report: dict[str, Any]) -> list[tuple[type, dict[str, Any]]]:
    """The registered class and recipe entry of each method the run used (one no longer registered is skipped:
    an old run folder still gets its report)."""
    from kdforge.methods import METHODS

    entries = report.get("recipe", {}).get("methods") or []
    return [(METHODS.get(e["name"]), e) for e in entries if isinstance(e, dict) and e.get("name") in METHODS]
