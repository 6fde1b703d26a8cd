"""Hinton, Vinyals & Dean (2015) on MNIST, small: does a distilled MLP beat the same MLP on labels?

Everything runs through kdforge's bundled recipes and runner:

1. ``mnist_teacher``: MLP 784-1200-1200-10 with dropout and weight decay, labels only,
   on the 8,000-image training split (one seed).
2. ``mnist_kd``: the unregularised student (784-800-800-10 by default) distilled at
   T = 20 (0.1 CE + 0.9 T^2 KL), and the runner's baseline, the same student on labels
   only, over several seeds.
3. Optionally a much smaller student (``--small-hidden``, e.g. 30 30) at several
   temperatures, where Hinton found that T matters (T in [2.5, 4] best at 30 units).

Only MNIST's 10,000-image test set is available offline, so a fixed stratified split
of it (``split_seed`` 0) gives 8,000 training and 2,000 test images: errors are out of
2,000, not Hinton's 10,000, with 7.5x less training data.

    .venv/bin/python benchmarks/classification/run_hinton_mnist.py
    .venv/bin/python benchmarks/classification/run_hinton_mnist.py --table   # re-print from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# before kdforge is imported: no progress bars in logs, and the shared data found from any folder
os.environ.setdefault("KDFORGE_PROGRESS", "0")
os.environ.setdefault("KDFORGE_DATA_DIR", str((ROOT.parent / "shared" / "data").resolve()))

RESULTS = HERE / "results-hinton.json"
#: runs go under a folder named runs/, which .gitignore keeps out of git
RUNS = HERE / "runs" / "hinton"
TEST_SIZE = 2000


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())} UTC load {os.getloadavg()[0]:.2f}] {msg}", flush=True)


def errors(accuracy: float) -> int:
    return round((1.0 - accuracy) * TEST_SIZE)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def train_teacher(epochs: float, out: Path) -> dict[str, Any]:
    from kdforge.checks import load_recipe
    from kdforge.runner import run_recipe

    recipe = load_recipe("mnist_teacher", [f"output.dir={out}", "output.overwrite=true", f"training.epochs={epochs}"])
    started = time.perf_counter()
    report = run_recipe(recipe)
    model = report["runs"][0]["models"]["student"]
    accuracy = model["metrics"]["accuracy"]
    log(f"teacher: accuracy {accuracy:.4f} ({errors(accuracy)} errors)")
    return {
        "hidden": recipe.student["hidden"],
        "dropout": recipe.student["dropout"],
        "epochs": epochs,
        "params": model["params"],
        "accuracy": accuracy,
        "errors": errors(accuracy),
        "train_seconds": model["train"]["train_seconds"],
        "wall_seconds": time.perf_counter() - started,
        "model": str(recipe.run_dir / "model"),
    }


def distill(
    teacher: str, hidden: list[int], temperature: float, epochs: float, seeds: list[int], out: Path, baseline: bool
) -> dict[str, Any]:
    """One student size at one temperature over ``seeds``; with ``baseline`` also the student on labels only."""
    from kdforge.checks import load_recipe
    from kdforge.runner import run_recipe

    name = f"student-{'-'.join(map(str, hidden))}-T{temperature:g}"
    overrides = [
        f"output.dir={out}",
        f"output.name={name}",
        "output.overwrite=true",
        f"teacher.model={teacher}",
        f"student.hidden={hidden}",
        f"objective[1].params.temperature={temperature}",
        f"training.epochs={epochs}",
        f"evaluation.baseline={str(baseline).lower()}",
    ]
    recipe = load_recipe("mnist_kd", overrides)
    started = time.perf_counter()
    report = run_recipe(recipe, seeds=seeds)
    row: dict[str, Any] = {
        "name": name,
        "hidden": hidden,
        "temperature": temperature,
        "objective": report["objective"],
        "epochs": epochs,
        "seeds": seeds,
        "wall_seconds": time.perf_counter() - started,
    }
    for role in ("student", "baseline"):
        runs = [r["models"][role] for r in report["runs"] if role in r["models"]]
        if not runs:
            continue
        accuracies = [r["metrics"]["accuracy"] for r in runs]
        row[role] = {
            "params": runs[0]["params"],
            "accuracy": summary(accuracies),
            "errors": summary([float(errors(a)) for a in accuracies]),
            "train_seconds": summary([r["train"]["train_seconds"] for r in runs]),
        }
        log(f"{name} {role}: errors {row[role]['errors']['values']}")
    return row


def gap_closed(teacher_errors: float, baseline_errors: float, student_errors: float) -> float | None:
    """Share of the baseline-to-teacher gap (in test errors) that distillation closes."""
    gap = baseline_errors - teacher_errors
    return (baseline_errors - student_errors) / gap if gap > 0 else None


def machine() -> dict[str, Any]:
    import torch

    lines = Path("/proc/cpuinfo").read_text().splitlines()
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = names[0] if names else platform.processor()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return {
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git_head": commit.stdout.strip(),
        "load_average_at_end": os.getloadavg(),
    }


def fmt(stat: dict[str, Any], digits: int) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def table(results: dict[str, Any]) -> str:
    teacher = results["teacher"]
    lines = [
        "| model | hidden | T | test errors / 2000 (mean ± std) | accuracy (mean ± std) | gap closed | seeds |",
        "|---|---|---:|---:|---:|---:|---|",
        f"| teacher (dropout {teacher['dropout']}) | {'-'.join(map(str, teacher['hidden']))} | – |"
        f" {teacher['errors']} | {teacher['accuracy']:.4f} | – | 0 |",
    ]
    for row in results["students"]:
        size = "-".join(map(str, row["hidden"]))
        seeds = ",".join(map(str, row["seeds"]))
        if "baseline" in row:
            base = row["baseline"]
            lines.append(
                f"| student, labels only | {size} | – | {fmt(base['errors'], 1)} | {fmt(base['accuracy'], 4)} |"
                f" – | {seeds} |"
            )
        kd = row["student"]
        closed = row.get("gap_closed")
        lines.append(
            f"| student, distilled | {size} | {row['temperature']:g} | {fmt(kd['errors'], 1)} |"
            f" {fmt(kd['accuracy'], 4)} | {'–' if closed is None else f'{closed:.2f}'} | {seeds} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-epochs", type=float, default=20)
    parser.add_argument("--student-epochs", type=float, default=10)
    parser.add_argument("--hidden", type=int, nargs="+", default=[800, 800], help="the main student's hidden widths")
    parser.add_argument("--temperature", type=float, default=20.0)
    parser.add_argument("--small-hidden", type=int, nargs="*", default=[30, 30], help="empty: no small student")
    parser.add_argument("--small-temperatures", type=float, nargs="*", default=[20.0, 4.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reuse-teacher", action="store_true", help="keep the teacher of an earlier run")
    parser.add_argument("--table", action="store_true", help="print the table of results-hinton.json and stop")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(RESULTS.read_text())))
        return

    started = time.perf_counter()
    teacher = (
        json.loads(RESULTS.read_text())["teacher"] if args.reuse_teacher else train_teacher(args.teacher_epochs, RUNS)
    )
    plan = [(args.hidden, args.temperature, True)]
    if args.small_hidden:
        plan += [(args.small_hidden, t, i == 0) for i, t in enumerate(args.small_temperatures)]
    students = []
    for hidden, temperature, baseline in plan:
        row = distill(teacher["model"], hidden, temperature, args.student_epochs, args.seeds, RUNS, baseline)
        base = row.get("baseline") or next(s["baseline"] for s in students if s["hidden"] == hidden)
        row["gap_closed"] = gap_closed(teacher["errors"], base["errors"]["mean"], row["student"]["errors"]["mean"])
        students.append(row)
    results = {
        "what": "Hinton KD on MNIST (8,000-image train / 2,000-image test split of the t10k set, split_seed 0)",
        "command": "KDFORGE_PROGRESS=0 .venv/bin/python benchmarks/classification/run_hinton_mnist.py "
        + " ".join(sys.argv[1:]),
        "teacher": teacher,
        "students": students,
        "total_seconds": time.perf_counter() - started,
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
