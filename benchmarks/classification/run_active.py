"""Active distillation on SST-2: which pool points to buy the teacher's outputs for.

The SST-2 teacher of ``run_text.py`` (all-MiniLM-L6-v2 + head, fine-tuned) teaches its
2-layer cut (layers 0 and 5, head kept) with Hinton KD alone (T = 4): the pool
(``data.train_limit`` SST-2 training sentences) is treated as unlabeled and the student
sees only the teacher's logits of the points bought. ``data.selection`` = {strategy,
budget, rounds}: a random first quarter of the budget, then after each round of training
the strategy picks the next points (random, margin = student uncertainty, rad = robust
active distillation); each round trains ``--epochs`` over all points bought so far.

Each run's baseline (kdforge adds it) is the same cut student trained on the labels of as
many random pool points as the teacher was queried on, for as many optimizer steps as all
rounds together. Every seed is its own ``run_recipe`` with ``training.seed`` and
``data.selection.seed`` both set to it (written when ``--seeds`` did not change the latter;
it now defaults to ``training.seed``, and setting both gives the same runs).

Rows are written to results-active.json as they finish; a rerun skips rows already there.

    .venv/bin/python benchmarks/classification/run_active.py
    .venv/bin/python benchmarks/classification/run_active.py --budgets 400,800 --strategies random,rad
    .venv/bin/python benchmarks/classification/run_active.py --table
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
os.environ.setdefault("KDFORGE_PROGRESS", "0")
os.environ.setdefault("KDFORGE_DATA_DIR", str((ROOT.parent / "shared" / "data").resolve()))

RESULTS = HERE / "results-active.json"
#: runs go under benchmarks/classification/runs/, which .gitignore keeps out of git
RUNS = HERE / "runs" / "active"
TEACHER = HERE / "runs" / "text" / "sst2-teacher" / "model"
KD = "[{loss: hinton_kd, params: {temperature: 4.0}}]"
STRATEGIES = ("random", "margin", "rad")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())} UTC load {os.getloadavg()[0]:.2f}] {msg}", flush=True)


def key(strategy: str, budget: int, seed: int) -> str:
    return f"{strategy}-b{budget}-s{seed}"


def overrides(args: argparse.Namespace, strategy: str, budget: int, seed: int) -> list[str]:
    out = [
        f"output.dir={RUNS}",
        f"output.name={key(strategy, budget, seed)}",
        "output.overwrite=true",
        f"teacher.model={args.teacher}",
        "student={num_layers: 2}",
        f"objective={KD}",
        "data.dataset=sst2",
        f"data.train_limit={args.pool}",
        f"data.validation_limit={args.validation_limit}",
        f"data.max_length={args.max_length}",
        f"methods=[{{name: active_distillation, strategy: {strategy}, budget: {budget}, rounds: {args.rounds},"
        f" seed: {seed}}}]",
        f"training.seed={seed}",
        f"training.epochs={args.epochs}",
        f"training.batch_size={args.batch_size}",
        f"training.schedule.warmup_steps={args.warmup}",
        "training.eval_every=1000000",
        "evaluation.baseline=true",
        f"evaluation.batch_size={args.eval_batch_size}",
        f"evaluation.throughput_batches={args.throughput_batches}",
        f"evaluation.throughput_repeats={args.throughput_repeats}",
    ]
    if args.test_limit:
        out.append(f"data.test_limit={args.test_limit}")
    return out


def extract(report: dict[str, Any]) -> dict[str, Any]:
    run = report["runs"][0]
    models = run["models"]
    selection = models["student"]["train"]["selection"]
    return {
        "teacher": models["teacher"]["metrics"],
        "student": models["student"]["metrics"],
        "student_fidelity": models["student"].get("fidelity"),
        "baseline": models["baseline"]["metrics"],
        "baseline_fidelity": models["baseline"].get("fidelity"),
        "teacher_queries": selection["teacher_queries"],
        "pool": selection.get("pool"),
        "rounds": selection["rounds"],
        "student_steps": models["student"]["train"]["steps"],
        "baseline_steps": models["baseline"]["train"]["steps"],
        "baseline_train": {k: v for k, v in models["baseline"]["train"].items() if k in ("steps", "train_seconds")},
    }


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(results: dict[str, Any]) -> str:
    rows = results.get("runs", {})
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for row in rows.values():
        groups.setdefault((row["budget"], row["strategy"]), []).append(row)
    lines = [
        "| budget | strategy | seeds | student accuracy | student macro-F1 | top-1 agreement | teacher queries |"
        " baseline accuracy | baseline macro-F1 | steps (student = baseline) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (budget, strategy), group in sorted(groups.items(), key=lambda g: (g[0][0], STRATEGIES.index(g[0][1]))):
        group.sort(key=lambda r: r["seed"])
        lines.append(
            f"| {budget} | {strategy} | {','.join(str(r['seed']) for r in group)} |"
            f" {mean_std([r['student']['accuracy'] for r in group])} |"
            f" {mean_std([r['student']['macro_f1'] for r in group])} |"
            f" {mean_std([r['student_fidelity']['top1_agreement'] for r in group if r.get('student_fidelity')])} |"
            f" {'/'.join(str(r['teacher_queries']) for r in group)} |"
            f" {mean_std([r['baseline']['accuracy'] for r in group])} |"
            f" {mean_std([r['baseline']['macro_f1'] for r in group])} |"
            f" {'/'.join(str(r['student_steps']) + '=' + str(r['baseline_steps']) for r in group)} |"
        )
    lines += ["", "Per-round validation accuracy (first seed of each group; points bought so far in brackets):", ""]
    lines += [
        "| budget | strategy | seed | " + " | ".join(f"round {i}" for i in range(4)) + " |",
        "|---|---|---|---|---|---|---|",
    ]
    for (budget, strategy), group in sorted(groups.items(), key=lambda g: (g[0][0], STRATEGIES.index(g[0][1]))):
        first = min(group, key=lambda r: r["seed"])
        cells = [f"{r.get('eval_accuracy', float('nan')):.4f} ({r['total']})" for r in first["rounds"]]
        lines.append(f"| {budget} | {strategy} | {first['seed']} | " + " | ".join(cells) + " |")
    teachers = {round(r["teacher"]["accuracy"], 6) for r in rows.values()}
    lines += ["", f"Teacher test accuracy (in every run): {', '.join(f'{t:.4f}' for t in sorted(teachers))}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(TEACHER))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--budgets", default="400")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--pool", type=int, default=2000, help="data.train_limit: the unlabeled pool")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--epochs", type=float, default=1.0, help="epochs per round over the points bought so far")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2, help="warmup steps of each round's linear schedule")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--validation-limit", type=int, default=400)
    parser.add_argument("--test-limit", type=int, default=0, help="0: the full test set (1,821)")
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--throughput-batches", type=int, default=1)
    parser.add_argument("--throughput-repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"runs": {}}
    if args.table:
        print(table(results))
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    from kdforge.checks import load_recipe
    from kdforge.runner import run_recipe

    torch.set_num_threads(args.threads)
    settings = {k: v for k, v in vars(args).items() if k not in ("force", "table")}
    started_all = time.perf_counter()
    # seeds outermost: with time short, every strategy has seed 0 before any has seed 1
    for seed in [int(s) for s in args.seeds.split(",")]:
        for budget in [int(b) for b in args.budgets.split(",")]:
            for strategy in args.strategies.split(","):
                name = key(strategy, budget, seed)
                if name in results["runs"] and not args.force:
                    continue
                log(f"{name}")
                recipe = load_recipe("text_kd_sst2", overrides(args, strategy, budget, seed))
                started = time.perf_counter()
                report = run_recipe(recipe, seeds=[seed])
                wall = time.perf_counter() - started
                row = {"strategy": strategy, "budget": budget, "seed": seed, **extract(report), "wall_s": wall,
                       "run_dir": str(recipe.run_dir), "settings": settings,
                       "overrides": overrides(args, strategy, budget, seed)}  # fmt: skip
                if row["teacher_queries"] != budget:
                    log(f"WARNING: {name} used {row['teacher_queries']} teacher queries, budget {budget}")
                results["runs"][name] = row
                results["generated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
                RESULTS.write_text(json.dumps(results, indent=2) + "\n")
                log(
                    f"{name}: student {row['student']['accuracy']:.4f} baseline {row['baseline']['accuracy']:.4f}"
                    f" queries {row['teacher_queries']} steps {row['student_steps']}/{row['baseline_steps']}"
                    f" in {wall:.0f} s"
                )
    log(f"done in {time.perf_counter() - started_all:.0f} s")
    print(table(results))


if __name__ == "__main__":
    sys.exit(main())
