"""kdforge plan's estimate against the measured peak memory of real training (issue 9, part 5).

For each recipe, one fresh subprocess runs ``plan_recipe`` (the estimate), and ``--repeats``
fresh subprocesses each run the real ``run_recipe`` for a few optimizer steps and measure the
training phase's peak resident memory from /proc:

- ``baseline``: VmRSS when the runner starts to load the teacher (data already read, no model yet);
- at the start of the training phase the kernel's peak counter is reset (/proc/self/clear_refs <- 5),
  so VmHWM afterwards is the peak of training alone, not of the teacher's evaluation before it;
- **measured** = VmHWM at the end of training - baseline: what the models, the optimizer and the
  training steps added to the process (leftovers of the teacher's evaluation included: the process
  still holds them while it trains).

The subprocess stops once the training phase ends (no student evaluation, no report). Torch runs on
one thread (the machine's cores are shared). Run from the repository root:

    KDFORGE_DATA_DIR=../shared/data .venv/bin/python benchmarks/memory/run_plan.py --repeats 3

Writes ``benchmarks/memory/results.json`` and prints the Markdown table of the README. ``--gc-before-training``
(a diagnostic, not the measurement) collects garbage left in reference cycles before training starts.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # benchmarks/, for proc_memory
from proc_memory import reset_peak, status_kb  # noqa: E402

SST2_TEACHER = "benchmarks/classification/runs/bundled/text-teacher-sst2/model"
#: a few optimizer steps of each recipe as shipped (training batch, length, precision kept). The teacher's
#: evaluation before training is shrunk, and runs at the training batch size: the memory it frees stays in
#: glibc's heap, and a larger evaluation batch would leave more there than training itself needs.
SHORT = ["training.epochs=null", "training.steps=4", "training.checkpoint_every=null", "training.log_every=2",
         "training.eval_every=null", "evaluation.baseline=false", "evaluation.throughput_batches=1",
         "evaluation.throughput_repeats=1", "output.overwrite=true"]  # fmt: skip
RECIPES: dict[str, list[str]] = {
    "smollm2_kd": ["data.eval_limit=16"],
    "text_kd_sst2": [
        f"teacher.model={SST2_TEACHER}",
        "data.validation_limit=64",
        "data.test_limit=64",
        "evaluation.batch_size=32",
    ],
    "embedding_minilm_l6_to_l3": [
        "data.train_limit=512",
        "data.test.corpus_limit=200",
        "data.test.query_limit=20",
        "data.test.wikiqa=null",
        "data.test.latency_queries=1",
        "evaluation.batch_size=32",
    ],
}
MB = 1024**2


class TrainingDone(Exception):
    """Raised after the student's training phase: the measurement is made, the rest of the run is not needed."""


def _recipe(name: str, out: Path):
    from kdforge.checks import load_recipe

    return load_recipe(name, [*SHORT, *RECIPES[name], f"output.dir={out}"])


def child_plan(name: str, out: Path) -> dict:
    from kdforge.plan import plan_recipe

    started = time.perf_counter()
    plan = plan_recipe(_recipe(name, out))
    return {**plan.as_dict(), "peak": plan.peak, "seconds": time.perf_counter() - started}


def child_train(name: str, out: Path) -> dict:
    """Run the recipe, measuring around the runner's load_teacher and train (patched in kdforge.runner)."""
    import kdforge.runner as runner

    record: dict = {}
    load_teacher, train = runner.load_teacher, runner.train

    def measured_load_teacher(*args, **kwargs):
        record["baseline_kb"] = status_kb("VmRSS")
        return load_teacher(*args, **kwargs)

    def measured_train(*args, **kwargs):
        record["before_training_hwm_kb"] = status_kb("VmHWM")  # the teacher's evaluation, student built
        if os.environ.get("BENCH_GC_BEFORE_TRAINING") == "1":  # diagnostic: free cyclic garbage first
            record["gc_collected"] = gc.collect()
        record["training_start_kb"] = status_kb("VmRSS")
        record["peak_reset"] = reset_peak()
        result = train(*args, **kwargs)
        record["training_hwm_kb"] = status_kb("VmHWM")
        record["steps"] = result.steps
        raise TrainingDone

    runner.load_teacher, runner.train = measured_load_teacher, measured_train
    try:
        runner.run_recipe(_recipe(name, out))
    except TrainingDone:
        pass
    record["measured"] = (record["training_hwm_kb"] - record["baseline_kb"]) * 1024
    return record


def _child(mode: str, name: str, out: Path) -> dict:
    env = {**os.environ, "KDFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, __file__, "--child", mode, "--recipe", name, "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} {name} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def _row(name: str, plan: dict, runs: list[dict]) -> dict:
    measured = [r["measured"] for r in runs]
    median = statistics.median(measured)
    return {
        "recipe": name,
        "batch": plan["batch_size"],
        "sequence_length": plan["sequence_length"],
        "estimate": plan["peak"],
        "measured_median": median,
        "measured_min": min(measured),
        "measured_max": max(measured),
        "ratio": plan["peak"] / median,
        "within_25": abs(plan["peak"] / median - 1) <= 0.25,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| recipe | batch | seq length | estimate MB | measured MB, median (min-max) | estimate / measured"
        " | within 25% |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| `{r['recipe']}` | {r['batch']} | {r['sequence_length'] or '-'} | {r['estimate'] / MB:,.0f}"
            f" | {r['measured_median'] / MB:,.0f} ({r['measured_min'] / MB:,.0f}-{r['measured_max'] / MB:,.0f})"
            f" | {r['ratio']:.2f} | {'yes' if r['within_25'] else '**no**'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--out", type=Path, default=Path("/tmp/kdforge-memory-bench"))
    parser.add_argument("--results", type=Path, default=HERE / "results.json")
    parser.add_argument(
        "--gc-before-training",
        action="store_true",
        help="diagnostic: gc.collect() just before training (frees garbage left in reference cycles)",
    )
    parser.add_argument("--child", choices=["plan", "train"])
    parser.add_argument("--recipe")
    args = parser.parse_args()

    if args.child:
        import torch

        torch.set_num_threads(1)
        result = (child_plan if args.child == "plan" else child_train)(args.recipe, args.out)
        print("RESULT " + json.dumps(result), flush=True)
        return

    if args.gc_before_training:
        os.environ["BENCH_GC_BEFORE_TRAINING"] = "1"
    results = {}
    for name in args.recipes:
        plan = _child("plan", name, args.out)
        runs = []
        for i in range(args.repeats):
            runs.append(_child("train", name, args.out))
            print(f"{name} run {i + 1}: measured {runs[-1]['measured'] / MB:,.0f} MB", file=sys.stderr, flush=True)
        results[name] = {"plan": plan, "runs": runs, "row": _row(name, plan, runs)}
        print(f"{name}: estimate {plan['peak'] / MB:,.0f} MB ({plan['seconds']:.0f} s)", file=sys.stderr, flush=True)
    args.results.write_text(json.dumps(results, indent=2))
    print(table([r["row"] for r in results.values()]))


if __name__ == "__main__":
    main()
