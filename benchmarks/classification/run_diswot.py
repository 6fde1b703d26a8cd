"""DisWOT on scikit-learn digits: does the training-free score rank distilled students?

1. The teacher: the ``digits_teacher`` recipe (64-256-256-10) on the **full** training split
   (``data.train_limit=null``: 1347 examples; test split 25%, split_seed 0, as every digits
   recipe) for ``--teacher-epochs`` epochs (60 instead of the recipe's 150: 2.7x the data,
   and the CPU budget of the whole script is ~15 minutes).
2. The score: for each candidate MLP, ``rank_candidates`` (the code of ``kdforge students
   rank``) on one batch of 64 training examples, once per seed (the seed draws the batch and
   the candidate's initial weights), averaged over the seeds; with the paper's Gaussian
   N(0, 1) initialisation and, for comparison, PyTorch's default one. The teacher's features
   are 256 wide and no candidate's are, so d_sem is kdforge's width-independent form.
3. The truth: each candidate distilled with the ``digits_kd`` recipe as shipped (Hinton KD,
   T = 8, 500 training examples) but ``--epochs`` epochs and no baseline, for each seed;
   test accuracy averaged over the seeds.

It reports Spearman's rho (``scipy.stats.spearmanr``) between the mean score and the mean
distilled accuracy over the candidates, that of each distance alone, and that of the
parameter count (the baseline a score must beat). Runs go to a temporary folder.

    KDFORGE_PROGRESS=0 .venv/bin/python benchmarks/classification/run_diswot.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from scipy.stats import spearmanr

from kdforge.checks import load_recipe
from kdforge.models.diswot import rank_candidates, sample_batch
from kdforge.runner import run_recipe
from kdforge.tasks import TASKS

HERE = Path(__file__).resolve().parent
#: depth 1-3, width 8-128
CANDIDATES = [
    [8],
    [16],
    [32],
    [64],
    [128],
    [8, 8],
    [32, 32],
    [128, 64],
    [16, 16, 16],
    [32, 16, 8],
    [64, 64, 64],
    [128, 128, 128],
]
#: the paper's d_sem needs the student's last hidden layer as wide as the teacher's (256): a space where it is
MATCHED = [[256], [8, 256], [16, 256], [32, 256], [64, 256], [128, 256], [8, 8, 256], [32, 32, 256], [256, 256]]
#: what every run skips: timing the model many times, checkpoints
QUIET = ["evaluation.throughput_batches=1", "evaluation.throughput_repeats=1", "training.checkpoint_every=null"]


def train_teacher(work: Path, epochs: float) -> tuple[Path, float, float]:
    """The digits teacher on the full training split; its folder, test accuracy and seconds."""
    sets = [f"output.dir={work}", "data.train_limit=null", f"training.epochs={epochs}", *QUIET]
    recipe = load_recipe("digits_teacher", sets)
    start = time.perf_counter()
    report = run_recipe(recipe)
    seconds = time.perf_counter() - start
    return recipe.run_dir / "model", report["summary"]["student"]["metrics"]["accuracy"]["mean"], seconds


def score_candidates(teacher_dir: Path, seeds: list[int], init: str, batch_size: int) -> tuple[list[dict], float]:
    """Per candidate: DisWOT's score, d_rel and d_sem averaged over ``seeds``; and the seconds it took."""
    candidates = json.dumps([{"hidden": h} for h in CANDIDATES])
    recipe = load_recipe("diswot_digits", [f"teacher.model={teacher_dir}", f"candidates={candidates}"])
    task = TASKS.get(recipe.task)(recipe)
    teacher = task.load_teacher(str(teacher_dir))
    per_seed: dict[str, list[Any]] = {}
    start = time.perf_counter()
    for seed in seeds:
        batch = sample_batch(task, batch_size, seed)
        for row in rank_candidates(task, teacher, recipe.candidates, batch, seed, init):  # type: ignore[arg-type]
            per_seed.setdefault(json.dumps(row.candidate["hidden"]), []).append(row)
    seconds = time.perf_counter() - start
    rows = []
    for hidden in CANDIDATES:
        scored = per_seed[json.dumps(hidden)]
        rows.append(
            {
                "hidden": hidden,
                "params": scored[0].params,
                "score": statistics.fmean(r.score for r in scored),
                "d_rel": statistics.fmean(r.d_rel for r in scored),
                "d_sem": statistics.fmean(r.d_sem for r in scored),
                "score_per_seed": [r.score for r in scored],
                "semantic": scored[0].semantic,
            }
        )
    return rows, seconds


def distill(teacher_dir: Path, hidden: list[int], work: Path, epochs: float, seeds: list[int]) -> dict[str, Any]:
    """The digits KD recipe into an MLP of ``hidden`` widths, one run per seed; test accuracies."""
    name = "kd-" + "-".join(map(str, hidden))
    sets = [
        f"teacher.model={teacher_dir}",
        f"student.hidden={json.dumps(hidden)}",
        f"output.dir={work}",
        f"output.name={name}",
        "training.epochs=" + str(epochs),
        "evaluation.baseline=false",
        *QUIET,
    ]
    start = time.perf_counter()
    report = run_recipe(load_recipe("digits_kd", sets), seeds=seeds)
    accuracy = report["summary"]["student"]["metrics"]["accuracy"]
    return {
        "accuracy": accuracy["mean"],
        "accuracy_std": accuracy["std"],
        "accuracy_per_seed": accuracy["values"],
        "seconds": time.perf_counter() - start,
    }


def spearman(x: list[float], y: list[float]) -> dict[str, float]:
    result = spearmanr(x, y)
    return {"rho": float(result.statistic), "p": float(result.pvalue)}


def correlations(scored: list[dict], accuracy: list[float]) -> dict[str, Any]:
    # distances: smaller is better, so their negatives are what should rise with accuracy
    return {
        "score": spearman([r["score"] for r in scored], accuracy),
        "-d_rel": spearman([-r["d_rel"] for r in scored], accuracy),
        "-d_sem": spearman([-r["d_sem"] for r in scored], accuracy),
    }


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "## DisWOT: training-free ranking of students (`classification/run_diswot.py`)",
        "",
        f"scikit-learn digits (test split 25%, split_seed 0). Teacher: `digits_teacher` (64-256-256-10) on the full"
        f" training split (1347 examples) for {cfg['teacher_epochs']:g} epochs, test accuracy"
        f" {result['teacher']['accuracy']:.4f}. Score: DisWOT on one"
        f" batch of {cfg['batch_size']} training examples per seed, mean over seeds {cfg['seeds']}; d_sem in"
        f" {_semantic_words(result)}. Distilled accuracy: `digits_kd` (Hinton KD,"
        f" T = 8, 500 training examples) for {cfg['epochs']:g} epochs, no baseline, test accuracy mean over seeds"
        f" {cfg['seeds']}. Measured on {cfg['machine']} (a shared machine:"
        f" times are indicative), {result['date']}.",
        "",
        "    " + cfg["command"],
        "",
        "| hidden | params | score (gaussian init) | d_rel | d_sem | score (default init)"
        " | distilled accuracy (mean ± std over seeds) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["candidates"]:
        g, d = row["gaussian"], row["default"]
        lines.append(
            f"| {row['hidden']} | {row['params']:,} | {g['score']:.4f} | {g['d_rel']:.4f} | {g['d_sem']:.4f}"
            f" | {d['score']:.4f} | {row['accuracy']:.4f} ± {row['accuracy_std']:.4f} |"
        )
    lines += [
        "",
        f"Spearman's rho with the distilled accuracy over the {len(result['candidates'])} candidates (p-value):",
        "",
        "| ranked by | rho | p |",
        "|---|---:|---:|",
    ]
    for label, corr in result["spearman"].items():
        lines.append(f"| {label} | {corr['rho']:.3f} | {corr['p']:.3g} |")
    t = result["seconds"]
    lines += [
        "",
        f"Time: teacher {t['teacher']:.1f} s; scoring all candidates over {len(cfg['seeds'])} seeds"
        f" {t['score_gaussian']:.2f} s (gaussian) and {t['score_default']:.2f} s (default);"
        f" distilling all of them {t['distill']:.1f} s.",
        "",
    ]
    return "\n".join(lines)


def _semantic_words(result: dict) -> str:
    forms = {c["gaussian"]["semantic"] for c in result["candidates"]}
    if forms == {"paper"}:
        return "the paper's form (every candidate's last hidden layer is as wide as the teacher's, 256)"
    return "kdforge's width-independent form (no candidate's last hidden layer is 256 wide)"


def main() -> None:
    global CANDIDATES
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-epochs", type=float, default=60)
    parser.add_argument("--epochs", type=float, default=15, help="distillation epochs of each candidate")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--space", choices=["mixed", "matched"], default="mixed", help="matched: last width 256")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    suffix = "" if args.space == "mixed" else "-matched"
    args.out = args.out or HERE / f"results-diswot{suffix}.json"
    args.markdown = args.markdown or HERE / f"diswot{suffix}.md"
    if args.space == "matched":
        CANDIDATES = MATCHED
    os.environ.setdefault("KDFORGE_PROGRESS", "0")
    seeds = [int(s) for s in args.seeds.split(",")]
    command = "KDFORGE_PROGRESS=0 .venv/bin/python benchmarks/classification/run_diswot.py"
    command += " --space matched" if args.space == "matched" else ""
    if args.teacher_epochs != 60 or args.epochs != 15 or args.seeds != "0,1,2" or args.batch_size != 64:
        command += f" --teacher-epochs {args.teacher_epochs:g} --epochs {args.epochs:g}"
        command += f" --seeds {args.seeds} --batch-size {args.batch_size}"

    with tempfile.TemporaryDirectory(prefix="diswot-") as tmp:
        work = Path(tmp)
        teacher_dir, teacher_accuracy, teacher_seconds = train_teacher(work, args.teacher_epochs)
        gaussian, gaussian_seconds = score_candidates(teacher_dir, seeds, "gaussian", args.batch_size)
        default, default_seconds = score_candidates(teacher_dir, seeds, "default", args.batch_size)
        distilled = [distill(teacher_dir, hidden, work, args.epochs, seeds) for hidden in CANDIDATES]

    accuracy = [d["accuracy"] for d in distilled]
    spearmans = {}
    for init, scored in (("gaussian", gaussian), ("default", default)):
        for key, value in correlations(scored, accuracy).items():
            spearmans[f"DisWOT, {init} init: {key}"] = value
    spearmans["parameter count"] = spearman([r["params"] for r in gaussian], accuracy)
    result = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": {
            "candidates": CANDIDATES,
            "seeds": seeds,
            "teacher_epochs": args.teacher_epochs,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "command": command,
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
        },
        "teacher": {
            "recipe": "digits_teacher",
            "train_limit": None,
            "epochs": args.teacher_epochs,
            "accuracy": teacher_accuracy,
        },
        "candidates": [
            {"hidden": hidden, "params": g["params"], "gaussian": g, "default": d, **dist}
            for hidden, g, d, dist in zip(CANDIDATES, gaussian, default, distilled)
        ],
        "spearman": spearmans,
        "seconds": {
            "teacher": teacher_seconds,
            "score_gaussian": gaussian_seconds,
            "score_default": default_seconds,
            "distill": sum(d["seconds"] for d in distilled),
        },
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.markdown.write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
