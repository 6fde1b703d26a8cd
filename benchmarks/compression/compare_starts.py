"""Which start makes the better student: evenly spaced layers, layers kept by importance, or Minitron width pruning?

Issue 23's first goal, on SmolLM2-135M-Instruct (30 layers, TinyShakespeare, 64-token blocks): students of
(about) the same parameter count, distilled with the same objective (forward KL against the teacher's
top-64 cache, no cross-entropy) for the same steps, several seeds, everything else from
``benchmarks/llm/objectives_base.yaml``:

- ``even``: 6 of the 30 layers, evenly spaced (what kdforge did before);
- ``importance``: the 6 layers of highest block influence (ShortGPT);
- ``angular``: all but the 24-layer span of least angular distance (Gromov et al.);
- ``minitron``: the 12 layers of highest block influence, then each layer's MLP cut from 1,536 to 512
  channels by activation magnitude (Minitron): 12 x 1.77M = 6 x 3.54M decoder parameters.

Each start is one ``kdforge run --seeds`` subprocess (``compare_objectives.run_config``); the table gives the
mean and std over seeds of the held-out KL(teacher || student) in nats per token, top-1 agreement and test
perplexity, and the student's parameters.

    .venv/bin/python benchmarks/compression/compare_starts.py --steps 40 \
        --out benchmarks/compression/results-starts.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "llm"))
from compare_objectives import ROOT, Config, ensure_cache, fmt, run_config  # noqa: E402

FORWARD_KL = "[{loss: forward_kl, field: logits, weight: 1.0}]"
STARTS = [
    Config("even", "6 layers, evenly spaced", FORWARD_KL, ["student.from_teacher={num_layers: 6}"]),
    Config("importance", "6 layers, block influence", FORWARD_KL,
           ["student.from_teacher={num_layers: 6, select: importance}"]),
    Config("angular", "6 layers, angular distance", FORWARD_KL,
           ["student.from_teacher={num_layers: 6, select: angular}"]),
    Config("minitron", "12 layers (importance), MLP 1536 -> 512", FORWARD_KL,
           ["student.from_teacher={num_layers: 12, select: importance}", "student.prune={intermediate: 512}"]),
]  # fmt: skip


def table(rows: list[dict]) -> str:
    lines = [
        "| start | student | parameters | held-out KL(teacher‖student) | top-1 agreement | test perplexity |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if not r.get("mean_kl"):
            lines.append(f"| {r['name']} | {r['params']} | – | failed (rc {r['rc']}) | – | – |")
            continue
        params = r["student_params"]["mean"] if isinstance(r["student_params"], dict) else r["student_params"]
        lines.append(
            f"| {r['name']} | {r['params']} | {params / 1e6:.1f}M | {fmt(r['mean_kl'], 4)}"
            f" | {fmt(r['top1_agreement'], 4)} | {fmt(r['perplexity'], 2)} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default=None, help="comma-separated: " + ",".join(c.name for c in STARTS))
    parser.add_argument("--out", default="/tmp/kdforge_starts.json")
    parser.add_argument("--workdir", default="/tmp/kdforge-llm-objectives", help="cache (shared), runs and logs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=0)
    parser.add_argument("--keep-models", action="store_true")
    args = parser.parse_args()
    starts = [c for c in STARTS if not args.only or c.name in args.only.split(",")]

    workdir = Path(args.workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("KDFORGE_DATA_DIR", str((ROOT / ".." / "shared" / "data").resolve()))
    env["KDFORGE_PROGRESS"] = "0"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    common = ["--set", f"teacher.path={workdir / 'cache'}", "--set", f"output.dir={workdir / 'runs'}"]
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    summary = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit.stdout.strip(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seeds": args.seeds,
        "steps": args.steps,
        "rows": [],
    }
    started = time.perf_counter()
    ensure_cache(workdir, env, common)
    for cfg in starts:
        summary["rows"].append(run_config(cfg, args, workdir, env, [*common, "--set", f"training.steps={args.steps}"]))
        summary["wall_seconds"] = time.perf_counter() - started
        Path(args.out).write_text(json.dumps(summary, indent=2))
    print()
    print(table(summary["rows"]))


if __name__ == "__main__":
    main()
