"""Training throughput on 1 and 2 processes (issue 10): the same recipe, the same global batch.

For each recipe and each setting below, ``--repeats`` fresh runs of ``kdforge run`` (the student
phase only: no baseline, no periodic evaluation, no memory plan). Throughput is the student's
training examples per second, ``steps * batch_size / train_seconds``, where ``train_seconds`` is the
runner's own clock around the training loop (model loading, evaluation and the report are not in
it). Settings, run in turn within each repeat so that a noisy minute hits all of them:

- ``1p x 2t``: one process, torch on 2 threads (the machine's 2 cores): the baseline;
- ``1p x 1t``: one process on 1 thread;
- ``2p x 1t``: ``accelerate launch --multi_gpu --num_processes 2`` (gloo on the CPU), 1 thread each.

Ratios are each run's throughput over the baseline's of the same repeat; the table gives medians.
Run from the repository root:

    KDFORGE_DATA_DIR=../shared/data .venv/bin/python benchmarks/processes/run_processes.py --repeats 3

Writes ``benchmarks/processes/results.json`` and prints the Markdown table of ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BIN = Path(sys.executable).parent

COMMON = [
    "training.epochs=null", "training.checkpoint_every=null", "training.eval_every=null",
    "evaluation.baseline=false", "evaluation.throughput_batches=1", "evaluation.throughput_repeats=1",
]  # fmt: skip
#: recipe -> (its overrides, with the teacher filled in by ``setup``); each global batch is the recipe's own
RECIPES: dict[str, list[str]] = {
    # a 64-16-10 MLP: almost no compute per step, so the processes' exchange of gradients dominates
    "digits_kd": ["training.steps=200"],
    # MiniLM-L6 teacher, L3 student on SciFact texts: a transformer step, batch 32 of up to 256 tokens
    "embedding_minilm_l6_to_l3": [
        "training.steps=8",
        "data.train_limit=256",
        "data.test.corpus_limit=50",
        "data.test.query_limit=5",
        "data.test.wikiqa=null",
        "data.test.latency_queries=1",
    ],
}
SETTINGS = {"1p x 2t": (1, 2), "1p x 1t": (1, 1), "2p x 1t": (2, 1)}
BASELINE = "1p x 2t"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(processes: int) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "kdforge"]
    return [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(_free_port()), "-m", "kdforge"]  # fmt: skip


def run(recipe: str, overrides: list[str], processes: int, threads: int, out: Path) -> dict:
    sets = [arg for s in [*COMMON, *overrides, f"output.dir={out}", "output.name=run"] for arg in ("--set", s)]
    env = {**os.environ, "KDFORGE_PROGRESS": "0", "KDFORGE_PLAN": "0", "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    done = subprocess.run([*command(processes), "run", recipe, *sets], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{recipe} on {processes} processes failed:\n{done.stderr[-3000:]}")
    report = json.loads((out / "run" / "report.json").read_text())
    train = report["runs"][0]["models"]["student"]["train"]
    batch = report["recipe"]["training"]["batch_size"]
    return {
        "steps": train["steps"],
        "batch_size": batch,
        "train_seconds": train["train_seconds"],
        "examples_per_s": train["steps"] * batch / train["train_seconds"],
        "final_loss": train["final_loss"],
        "wall_seconds": wall,
    }


def setup(work: Path) -> dict[str, list[str]]:
    """The recipes' overrides, with a digits teacher trained here (a few seconds)."""
    teacher = work / "teachers"
    subprocess.run(
        [sys.executable, "-m", "kdforge", "run", "digits_teacher", "--set", "training.epochs=20",
         "--set", f"output.dir={teacher}"],
        env={**os.environ, "KDFORGE_PROGRESS": "0"}, check=True, capture_output=True,
    )  # fmt: skip
    recipes = {name: list(sets) for name, sets in RECIPES.items()}
    recipes["digits_kd"].append(f"teacher.model={teacher / 'digits-teacher' / 'model'}")
    return recipes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recipes", default=",".join(RECIPES))
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": commit.stdout.strip(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "command": f"KDFORGE_DATA_DIR=../shared/data .venv/bin/python benchmarks/processes/run_processes.py"
        f" --repeats {args.repeats}",
        "recipes": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        recipes = setup(work)
        for name in args.recipes.split(","):
            runs: dict[str, list[dict]] = {setting: [] for setting in SETTINGS}
            for repeat in range(args.repeats):
                for setting, (processes, threads) in SETTINGS.items():
                    out = work / f"{name}-{setting.replace(' ', '')}-{repeat}"
                    runs[setting].append(run(name, recipes[name], processes, threads, out))
                    print(f"{name} {setting} #{repeat}: {runs[setting][-1]['examples_per_s']:.1f} examples/s",
                          file=sys.stderr)  # fmt: skip
            summary = {}
            for setting, values in runs.items():
                ratios = [v["examples_per_s"] / b["examples_per_s"] for v, b in zip(values, runs[BASELINE])]
                summary[setting] = {
                    "examples_per_s_median": statistics.median(v["examples_per_s"] for v in values),
                    "examples_per_s_all": [round(v["examples_per_s"], 2) for v in values],
                    "ratio_to_baseline_median": statistics.median(ratios),
                    "wall_seconds_median": statistics.median(v["wall_seconds"] for v in values),
                    "final_loss": [v["final_loss"] for v in values],
                }
            results["recipes"][name] = {"runs": runs, "summary": summary, "batch_size": runs[BASELINE][0]["batch_size"]}
    (HERE / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results: dict) -> str:
    lines = [
        "| recipe | global batch | setting | examples/s, median (all) | / 1p x 2t, median | run wall s, median |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results["recipes"].items():
        for setting, s in result["summary"].items():
            runs = ", ".join(f"{v:.1f}" for v in s["examples_per_s_all"])
            lines.append(
                f"| `{name}` | {result['batch_size']} | {setting} | {s['examples_per_s_median']:.1f} ({runs})"
                f" | {s['ratio_to_baseline_median']:.2f} | {s['wall_seconds_median']:.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
