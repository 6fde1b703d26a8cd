"""``kdforge students``: choose a student architecture before training one (``rank``: DisWOT on the recipe's
candidates; ``search``: AutoDistil-style search of a causal-LM teacher's family). A module of its own so
that ``kdforge.cli`` stays readable; ``cli`` adds this sub-app."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from kdforge.console import make_console
from kdforge.errors import KDForgeError

out = make_console()

students = typer.Typer(no_args_is_help=True, help="Choose a student architecture before training one.")


@students.command("rank")
def students_rank(
    recipe: str = typer.Argument(..., help="recipe file with candidates:, or the name of a bundled recipe"),
    set_: list[str] = typer.Option([], "--set", help="override a field, e.g. --set teacher.model=runs/t/model"),
    batch_size: int = typer.Option(64, "--batch-size", min=1, help="training examples in the one scored batch"),
    seed: int = typer.Option(0, "--seed", help="seeds the batch and every candidate's initial weights"),
    init: str = typer.Option(
        "gaussian", "--init", help="candidates' weights: gaussian (N(0,1), the paper's) or default"
    ),
) -> None:
    """Rank the recipe's candidate students for its teacher without training them (DisWOT, CVPR 2023).

    Each candidate, freshly initialised, is compared with the teacher on one training batch:
    score = -(sample-relation distance + class-gradient distance); higher is better. Writes nothing.
    """
    from kdforge.checks import load_recipe
    from kdforge.commands import rank_recipe

    if init not in ("gaussian", "default"):
        raise KDForgeError(f"--init {init}: use gaussian or default")
    parsed = load_recipe(recipe, set_)
    rows = rank_recipe(parsed, batch_size=batch_size, seed=seed, init=init)  # type: ignore[arg-type]
    table = Table(title=f"{parsed.name}: DisWOT ranking for {parsed.teacher_label()} (batch {batch_size}, seed {seed})")
    for col in ("rank", "candidate", "params", "score", "d_rel", "d_sem"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for i, row in enumerate(rows, start=1):
        candidate = ", ".join(f"{key}: {value}" for key, value in row.candidate.items())
        table.add_row(str(i), candidate, f"{row.params:,}", f"{row.score:.4f}", f"{row.d_rel:.4f}", f"{row.d_sem:.4f}")
    out.print(table)
    if rows and rows[0].semantic == "classes":
        out.print("d_sem: kdforge's width-independent form (Gram of class gradients); widths differ from the teacher's")


@students.command("search")
def students_search(
    recipe: str = typer.Argument(..., help="a causal_lm recipe file, or the name of a bundled recipe"),
    budget: str = typer.Option(..., "--budget", help="parameters (60M, 1.2B) or latency of one forward (40ms, 0.5s)"),
    set_: list[str] = typer.Option([], "--set", help="override a field, e.g. --set teacher.model=runs/t/model"),
    folder: Path | None = typer.Option(
        None, "--out", help="folder of the table and the short runs; default OUTPUT_DIR/NAME-search"
    ),
    candidates: int = typer.Option(
        8, "--candidates", min=1, help="candidates within the budget scored without training"
    ),
    train_best: int = typer.Option(3, "--train-best", min=0, help="the best of them then distilled for --steps"),
    steps: int = typer.Option(200, "--steps", min=1, help="steps of task-agnostic distillation per trained candidate"),
    latency_tokens: int = typer.Option(128, "--latency-tokens", min=1, help="tokens of the timed forward (batch 1)"),
) -> None:
    """Propose students of the teacher's family within a budget, scored without full training (AutoDistil).

    Candidates (depth by block importance, then Minitron width pruning of heads, MLP and hidden channels) are
    sized, timed on this machine, compared with the teacher with their inherited weights (KL, DisWOT's d_rel),
    and the best few distilled for a few hundred steps. Writes search.json and search.md in --out.
    """
    from kdforge.checks import load_recipe
    from kdforge.models.student_search import parse_budget
    from kdforge.search import search_recipe

    limit = parse_budget(budget)
    parsed = load_recipe(recipe, set_)
    folder = folder or Path(parsed.output.dir) / f"{parsed.name}-search"
    rows = search_recipe(
        parsed, limit, folder, candidates=candidates, train_best=train_best, steps=steps, latency_tokens=latency_tokens
    )
    table = Table(title=f"{parsed.name}: students within {limit} (best first)")
    for col in ("rank", "candidate", "params", "latency ms", "KL at start", "d_rel", f"KL after {steps}"):
        table.add_column(col, justify="left" if col == "candidate" else "right")
    for i, row in enumerate(rows, start=1):
        after = "–" if row.get("kl_after") is None else f"{row['kl_after']:.4f}"
        latency = "–" if row["latency_ms"] is None else f"{row['latency_ms']:.1f}"
        table.add_row(
            str(i),
            row["candidate"],
            f"{row['params']:,}",
            latency,
            f"{row['kl_at_start']:.4f}",
            f"{row['d_rel']:.4f}",
            after,
        )
    out.print(table)
    out.print(f"the table, with each candidate's student section: {folder / 'search.md'}", highlight=False)
