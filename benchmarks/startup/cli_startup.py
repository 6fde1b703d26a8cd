"""How long a `kdforge` command takes to start: this checkout against another revision.

Each command runs in a fresh process (as the CLI and every subprocess test do), alternating
the two checkouts so that the machine's load falls on both alike; the result is the median
of ``--repeats`` runs per (revision, command) and the ratio of the medians.

    python benchmarks/startup/cli_startup.py --baseline 14d234a --repeats 5

The baseline revision is checked out with ``git worktree`` into a temporary folder and run
with this checkout's Python (``PYTHONPATH`` points at its ``src``), so both use the same
packages. Commands: ``kdforge validate digits_kd`` (import and recipe checks only) and a
100-step digits run with a tiny teacher trained first (import, data, training, evaluation,
report).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = [
    "training.epochs=null",
    "training.steps=100",
    "evaluation.throughput_batches=1",
    "evaluation.throughput_repeats=1",
    "evaluation.baseline=false",
    "data.train_limit=200",
]


def timed(src: Path, args: list[str], cwd: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src), "KDFORGE_PROGRESS": "0"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kdforge", *args], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"kdforge {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="the git revision to compare with")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base = work / "baseline"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base), args.baseline], check=True,
                       capture_output=True)  # fmt: skip
        try:
            # a digits teacher for the runs, trained once by this checkout
            teacher_sets = [
                "training.epochs=null", "training.steps=200", "evaluation.baseline=false", "output.dir=teacher",
            ]  # fmt: skip
            sets = [a for s in teacher_sets for a in ("--set", s)]
            timed(ROOT / "src", ["run", "digits_teacher", *sets], work)
            teacher = next((work / "teacher").glob("*/model"))
            commands = {
                "validate digits_kd": ["validate", "digits_kd"],
                "run digits_kd (100 steps)": ["run", "digits_kd", *(a for s in [*RUN, f"teacher.model={teacher}"]
                                                                   for a in ("--set", s))],
            }  # fmt: skip
            times: dict[tuple[str, str], list[float]] = {}
            for i in range(args.repeats):
                for label, argv in commands.items():
                    for name, src in (("baseline", base / "src"), ("this checkout", ROOT / "src")):
                        extra = ["--set", f"output.dir=out-{name[:4]}-{i}"] if argv[0] == "run" else []
                        times.setdefault((label, name), []).append(timed(src, [*argv, *extra], work))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=False)
    print(f"| command | baseline {args.baseline} (s) | this checkout (s) | ratio |")
    print("|---|---|---|---|")
    for label in commands:
        old = statistics.median(times[(label, "baseline")])
        new = statistics.median(times[(label, "this checkout")])
        print(f"| {label} | {old:.2f} | {new:.2f} | {new / old:.2f} |")


if __name__ == "__main__":
    main()
