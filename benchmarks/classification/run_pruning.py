"""Data pruning + distillation on MNIST (Ben-Baruch et al., ICML 2025), small.

The teacher of ``run_hinton_mnist.py`` (784-1200-1200-10, trained on the full 8,000-image
training split) teaches a small MLP student that sees only a random share ``f`` of that
split (``data.prune``), with the loss (1 - alpha) CE + alpha T^2 KL. The paper's claim:
the best alpha grows as f shrinks (small alpha near f = 1, alpha near 1 at f = 0.1).

Every (f, alpha, seed) is one ``run_recipe`` of the bundled ``mnist_kd`` recipe with
``--set``-style overrides: ``objective[0].weight`` = 1 - alpha (the CE term),
``objective[1].weight`` = alpha (the hinton_kd term); alpha = 0 is the CE term alone, so
no teacher runs. Every run takes the same number of optimizer steps whatever f (the
epochs grow as f shrinks), and seed s both draws the kept subset (``data.prune.seed``)
and initialises the student, so each alpha of one (f, seed) sees the same images.

Rows are written to results-pruning.json as they finish; a rerun skips the rows there.

    .venv/bin/python benchmarks/classification/run_pruning.py
    .venv/bin/python benchmarks/classification/run_pruning.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# before kdforge is imported: no progress bars in logs, and the shared data found from any folder
os.environ.setdefault("KDFORGE_PROGRESS", "0")
os.environ.setdefault("KDFORGE_DATA_DIR", str((ROOT.parent / "shared" / "data").resolve()))

RESULTS = HERE / "results-pruning.json"
HINTON = HERE / "results-hinton.json"
#: runs go under a folder named runs/, which .gitignore keeps out of git
RUNS = HERE / "runs" / "pruning"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())} UTC load {os.getloadavg()[0]:.2f}] {msg}", flush=True)


def overrides(args: argparse.Namespace, teacher: str, fraction: float, alpha: float, seed: int) -> list[str]:
    name = f"f{fraction:g}-a{alpha:g}-s{seed}"
    common = [
        f"output.dir={RUNS}",
        f"output.name={name}",
        "output.overwrite=true",
        f"teacher.model={teacher}",
        f"student.hidden={args.hidden}",
        "training.epochs=null",
        f"training.steps={args.steps}",
        f"training.batch_size={args.batch_size}",
        f"training.lr={args.lr}",
        f"training.seed={seed}",
        f"methods=[{{name: data_pruning, fraction: {fraction}, by: random, seed: {seed}}}]",
        # alpha = 0 is the labels-only student: no separate baseline is needed
        "evaluation.baseline=false",
        # speed is not measured here; one timing batch keeps the report's fields filled cheaply
        "evaluation.throughput_batches=1",
        "evaluation.throughput_repeats=1",
    ]
    if alpha == 0:
        return [*common, "objective=[{loss: cross_entropy, field: logits}]"]
    return [
        *common,
        f"objective[0].weight={1 - alpha}",
        f"objective[1].weight={alpha}",
        f"objective[1].params.temperature={args.temperature}",
    ]


def run_one(args: argparse.Namespace, teacher: str, fraction: float, alpha: float, seed: int) -> dict[str, Any]:
    from kdforge.checks import load_recipe
    from kdforge.runner import run_recipe

    recipe = load_recipe("mnist_kd", overrides(args, teacher, fraction, alpha, seed))
    started = time.perf_counter()
    report = run_recipe(recipe)
    student = report["runs"][0]["models"]["student"]
    row = {
        "fraction": fraction,
        "alpha": alpha,
        "seed": seed,
        "accuracy": student["metrics"]["accuracy"],
        "steps": student["train"]["steps"],
        "kept": report["data_plan"]["prune"]["kept"],
        "train_seconds": student["train"]["train_seconds"],
        "wall_seconds": time.perf_counter() - started,
    }
    log(f"f={fraction:g} alpha={alpha:g} seed={seed}: accuracy {row['accuracy']:.4f} ({row['kept']} images)")
    return row


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean ± std of accuracy per (f, alpha), over the seeds measured."""
    cells: dict[tuple[float, float], list[float]] = {}
    for row in rows:
        cells.setdefault((row["fraction"], row["alpha"]), []).append(row["accuracy"])
    return [
        {
            "fraction": f,
            "alpha": a,
            "n": len(v),
            "mean": statistics.fmean(v),
            "std": statistics.stdev(v) if len(v) > 1 else 0.0,
        }
        for (f, a), v in sorted(cells.items(), key=lambda kv: (-kv[0][0], kv[0][1]))
    ]


def best_alpha(cells: list[dict[str, Any]]) -> dict[str, float]:
    best: dict[float, dict[str, Any]] = {}
    for cell in cells:
        if cell["fraction"] not in best or cell["mean"] > best[cell["fraction"]]["mean"]:
            best[cell["fraction"]] = cell
    return {f"{f:g}": cell["alpha"] for f, cell in best.items()}


def table(results: dict[str, Any]) -> str:
    cells = summarise(results["runs"])
    fractions = sorted({c["fraction"] for c in cells}, reverse=True)
    alphas = sorted({c["alpha"] for c in cells})
    by_key = {(c["fraction"], c["alpha"]): c for c in cells}
    best = best_alpha(cells)
    head = "| f (kept) | " + " | ".join(f"alpha = {a:g}" for a in alphas) + " | best alpha |"
    lines = [head, "|---" * (len(alphas) + 2) + "|"]
    for f in fractions:
        row = []
        for a in alphas:
            c = by_key.get((f, a))
            text = "–" if c is None else f"{c['mean']:.4f} ± {c['std']:.4f} (n={c['n']})"
            row.append(f"**{text}**" if c is not None and a == best[f"{f:g}"] else text)
        lines.append(f"| {f:g} | " + " | ".join(row) + f" | {best[f'{f:g}']:g} |")
    return "\n".join(lines)


def teacher_model(given: str | None) -> str:
    if given:
        return given
    if not HINTON.is_file():
        sys.exit(f"{HINTON} is missing: run run_hinton_mnist.py first, or give --teacher")
    return json.loads(HINTON.read_text())["teacher"]["model"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.2, 0.1])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps of every run, whatever f")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (cosine schedule, 50 warmup steps)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[100], help="the student's hidden widths")
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--teacher", help="teacher model folder (default: the one in results-hinton.json)")
    parser.add_argument("--table", action="store_true", help="print the table of results-pruning.json and stop")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(RESULTS.read_text())))
        return

    teacher = teacher_model(args.teacher)
    settings = {k: v for k, v in vars(args).items() if k not in ("table", "teacher")}
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": []}
    if results.get("settings", settings) != settings or results.get("teacher", teacher) != teacher:
        sys.exit(f"{RESULTS} holds runs with other settings; move it away to start a new sweep")
    results.update(
        what="MNIST data pruning + KD: student on a random share f of the 8,000-image split, (1-alpha) CE + alpha KD",
        command="KDFORGE_PROGRESS=0 .venv/bin/python benchmarks/classification/run_pruning.py "
        + " ".join(sys.argv[1:]),
        settings=settings,
        teacher=teacher,
    )
    done = {(r["fraction"], r["alpha"], r["seed"]) for r in results["runs"]}
    # seeds outermost: a sweep cut short still has every (f, alpha) for the seeds it finished
    for seed in args.seeds:
        for fraction in args.fractions:
            for alpha in args.alphas:
                if (fraction, alpha, seed) in done:
                    continue
                results["runs"].append(run_one(args, teacher, fraction, alpha, seed))
                results["cells"] = summarise(results["runs"])
                results["best_alpha"] = best_alpha(results["cells"])
                results["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
