"""Plots for the HTML report, returned as PNG bytes (embedded, so the page stands alone)."""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"teacher": "#4C72B0", "student": "#DD8452", "baseline": "#8C8C8C"}


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def loss_curves(curves: dict[str, list[list[dict[str, Any]]]]) -> bytes:
    """One panel per phase; one line per loss term (and the total), one faint line per extra seed."""
    phases = [p for p in ("student", "baseline") if any(curves.get(p, []))]
    fig, axes = plt.subplots(1, len(phases), figsize=(5.5 * len(phases), 3.6), squeeze=False)
    for ax, phase in zip(axes[0], phases):
        cmap = plt.get_cmap("tab10")
        for s, records in enumerate(curves[phase]):
            if not records:
                continue
            steps = [r["step"] for r in records]
            names = ["loss", *records[0]["terms"]]
            for i, name in enumerate(names):
                values = [r["loss"] if name == "loss" else r["terms"].get(name) for r in records]
                label = ("total" if name == "loss" else name) if s == 0 else None
                ax.plot(
                    steps, values, color=cmap(i), alpha=1.0 if s == 0 else 0.3, lw=1.6 if s == 0 else 0.8, label=label
                )
        ax.set_title(f"{phase}: training loss per term")
        ax.set_xlabel("optimizer step")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return png(fig)


def metric_bars(summary: dict[str, Any], section: str, title: str) -> bytes | None:
    roles = [r for r in ("teacher", "student", "baseline") if summary.get(r, {}).get(section)]
    if not roles:
        return None
    names = list(summary[roles[0]][section])
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(names), 3.4))
    width = 0.8 / len(roles)
    for j, role in enumerate(roles):
        means = [summary[role][section][n]["mean"] for n in names]
        stds = [summary[role][section][n]["std"] for n in names]
        xs = [i + (j - (len(roles) - 1) / 2) * width for i in range(len(names))]
        bars = ax.bar(xs, means, width, yerr=stds, capsize=3, color=COLORS[role], label=role)
        for bar, mean in zip(bars, means):
            ax.annotate(
                f"{mean:.3f}",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
            )
    ax.set_xticks(range(len(names)), names)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return png(fig)


def speed_size(summary: dict[str, Any], unit: str = "examples/s") -> bytes:
    roles = [r for r in ("teacher", "student") if r in summary]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    panels = [
        ("parameters", [summary[r]["params"] for r in roles], None),
        ("size on disk (KiB)", [summary[r]["size_bytes"] / 1024 for r in roles], None),
        (
            f"throughput ({unit})",
            [summary[r]["throughput"]["mean"] for r in roles],
            [summary[r]["throughput"]["std"] for r in roles],
        ),
    ]
    for ax, (title, values, err) in zip(axes, panels):
        ax.bar(roles, values, yerr=err, capsize=3, color=[COLORS[r] for r in roles])
        for i, v in enumerate(values):
            ax.annotate(f"{v:,.0f}", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    return png(fig)


def seed_pairs(runs: list[dict[str, Any]], metric: str) -> bytes:
    """Student against baseline, one point per seed: points above the diagonal favour KD."""
    xs = [r["models"]["baseline"]["metrics"][metric] for r in runs]
    ys = [r["models"]["student"]["metrics"][metric] for r in runs]
    fig, ax = plt.subplots(figsize=(4, 4))
    lo, hi = min(xs + ys), max(xs + ys)
    pad = (hi - lo) * 0.1 or 0.01
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="#999", lw=1, ls="--")
    ax.scatter(xs, ys, color=COLORS["student"], zorder=3)
    for r, x, y in zip(runs, xs, ys):
        ax.annotate(f"seed {r['seed']}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"baseline {metric}")
    ax.set_ylabel(f"distilled student {metric}")
    ax.set_title("per seed")
    ax.grid(alpha=0.3)
    return png(fig)


def eval_curves(evals: dict[str, list[dict[str, Any]]]) -> bytes | None:
    phases = [p for p, recs in evals.items() if recs]
    if not phases:
        return None
    names = sorted({k for p in phases for r in evals[p] for k in r["eval"]})
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        for phase in phases:
            recs = [r for r in evals[phase] if name in r["eval"]]
            ax.plot(
                [r["step"] for r in recs],
                [r["eval"][name] for r in recs],
                marker="o",
                ms=3,
                color=COLORS.get(phase, None),
                label=phase,
            )
        ax.set_title(name)
        ax.set_xlabel("optimizer step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return png(fig)


def scalar_curves(records: list[dict[str, Any]]) -> bytes | None:
    """Logged term-state values over optimizer steps (TAID's t, adaptive temperatures), one line each."""
    logged = [r for r in records if r.get("scalars")]
    if not logged:
        return None
    names = sorted({name for r in logged for name in r["scalars"]})
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    cmap = plt.get_cmap("tab10")
    for i, name in enumerate(names):
        points = [(r["step"], r["scalars"][name]) for r in logged if name in r["scalars"]]
        ax.plot([p[0] for p in points], [p[1] for p in points], color=cmap(i), lw=1.6, label=name)
    ax.set_title("student: term schedules")
    ax.set_xlabel("optimizer step")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return png(fig)


def layer_selection(record: dict[str, Any]) -> bytes | None:
    """The teacher's layers scored for a student cut from them (block influence, and the angular distance of
    each span when ``select: angular``), the kept layers marked."""
    influence = record.get("block_influence")
    if not influence:
        return None
    kept = set(record.get("kept", []))
    spans = record.get("angular_distance")
    fig, axes = plt.subplots(1, 2 if spans else 1, figsize=(11 if spans else 6, 3.4), squeeze=False)
    ax = axes[0][0]
    colors = [COLORS.get("student", "C1") if i in kept else "0.75" for i in range(len(influence))]
    ax.bar(range(len(influence)), influence, color=colors)
    ax.set_title(f"block influence (1 - cos) per teacher layer; kept ({record.get('select')}) in color", fontsize=9)
    ax.set_xlabel("teacher layer")
    ax.grid(alpha=0.3, axis="y")
    if spans:
        ax = axes[0][1]
        ax.plot(range(len(spans)), spans, marker="o", ms=3)
        ax.set_title(f"angular distance of each {record.get('span')}-layer span (removed: the lowest)", fontsize=9)
        ax.set_xlabel("first layer of the span")
        ax.grid(alpha=0.3)
    return png(fig)
