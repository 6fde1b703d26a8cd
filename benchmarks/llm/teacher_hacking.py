"""Teacher hacking (Tiapkin et al., 2025) at toy scale: a fixed offline set vs fresh generations.

Three tiny Llamas share one byte-level BPE tokenizer (512 tokens, trained on TinyShakespeare):

1. the **oracle** ("golden" model, 4 layers, hidden 128): trained by kdforge labels-only
   (cross-entropy, no teacher) on the first 200 KB of TinyShakespeare, packed text;
2. the **teacher** (2 layers, hidden 64): trained labels-only on the oracle's sampled
   answers to ``--teacher-prompts`` prompts (``data.mode: teacher_generated`` with
   ``data.generation.model`` = the oracle), so it is an imperfect copy of the oracle;
3. the **student** (1 layer, hidden 64, random init): distilled from the teacher with
   ``forward_kl`` (teacher online) on ``--train-prompts`` prompts for ``--epochs`` epochs,
   with the teacher-hacking monitor (``data.monitor.golden`` = the oracle) evaluating
   proxy_kl = KL(teacher || student) and golden_kl = KL(oracle || student) per token on the
   ``--test-prompts`` held-out prompts (answered by the teacher) once per epoch.

The student runs twice per seed, identical except for ``data.mode``:
``teacher_generated`` (the teacher answers each training prompt once; the same fixed set
every epoch) and ``online_generation`` (fresh teacher answers every epoch). Epoch 0 of both
is the same stored set. A prompt is a speaker's name line plus the first line of the
speech, ending in a newline (so the answer starts a new line and the prompt/answer token
boundary is the one the models see in running text); training, held-out and teacher
prompts come from disjoint parts of the play text (after the oracle's 200 KB).

The seed sets the student's initial weights, the data order (training.seed) and the
teacher's sampling (data.generation.seed). Everything runs on CPU in a work folder
(default a temp dir; ``--work`` keeps it, and reuses a trained oracle and teacher).

Writes ``teacher_hacking.png`` (proxy and golden vs step) next to this script (or
``--png``), a JSON summary into the work folder (or ``--json``), and prints a markdown table.

    .venv/bin/python benchmarks/llm/teacher_hacking.py                     # 1 seed, 50 epochs
    .venv/bin/python benchmarks/llm/teacher_hacking.py --seeds 0,1,2 --epochs 60 --train-prompts 32
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# tests/tiny_lm.py is a test helper (tiny BPE tokenizer, random Llamas); a benchmark may reuse it.
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("KDFORGE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from kdforge.recipe import parse_recipe  # noqa: E402
from kdforge.runner import run_recipe  # noqa: E402
from tiny_lm import make_llama, make_tokenizer  # noqa: E402

ORACLE_CHARS = 200_000  # the oracle's (and the tokenizer's) training text
MODES = ("teacher_generated", "online_generation")
LABEL = {"teacher_generated": "offline (fixed set)", "online_generation": "online (fresh each epoch)"}


def data_file() -> Path:
    base = Path(os.environ.get("KDFORGE_DATA_DIR", ROOT.parent / "shared" / "data"))
    if not base.is_absolute():
        base = ROOT / base
    return base / "tinyshakespeare" / "input.txt"


def speech_prompts(text: str) -> list[str]:
    """'NAME:\\nfirst line of the speech\\n' for every speech of ``text`` (in order)."""
    found = re.findall(r"\n\n([A-Z][A-Za-z ]{1,30}:\n[^\n]{10,80}\n)(?=[^\n])", text)
    return found


def save_random_llama(folder: Path, tokenizer, *, layers: int, hidden: int, seed: int) -> Path:
    """A tiny Llama at transformers' default init (std 0.02), to be trained from scratch."""
    model = make_llama(len(tokenizer), layers=layers, hidden=hidden, seed=seed)
    torch.manual_seed(seed)
    model.apply(model._init_weights)  # make_llama's std-0.2 weights suit tests, not training from scratch
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def write_jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


COMMON_EVAL = {"batch_size": 64, "throughput_batches": 1, "throughput_repeats": 1}


def train_oracle(work: Path, tokenizer, text_path: Path, steps: int) -> Path:
    folder = work / "runs" / "oracle" / "model"
    if (folder / "config.json").exists():
        return folder
    init = save_random_llama(work / "oracle-init", tokenizer, layers=4, hidden=128, seed=100)
    recipe = parse_recipe(
        {
            "name": "oracle",
            "task": "causal_lm",
            "student": {"model": str(init)},
            "data": {"format": "text", "path": str(text_path), "max_length": 64, "test_fraction": 0.05},
            "objective": [{"loss": "cross_entropy"}],
            "training": {
                "lr": 3e-3,
                "batch_size": 32,
                "steps": steps,
                "log_every": 50,
                "schedule": {"name": "cosine", "warmup_steps": 20},
                "device": "cpu",
            },
            "evaluation": COMMON_EVAL,
            "output": {"dir": str(work / "runs"), "overwrite": True},
        }
    )
    report = run_recipe(recipe)
    print(f"oracle: test perplexity {report['runs'][0]['models']['student']['metrics']['perplexity']:.2f}")
    return folder


def train_teacher(work: Path, tokenizer, oracle: Path, prompts: Path, steps: int) -> Path:
    folder = work / "runs" / "teacher" / "model"
    if (folder / "config.json").exists():
        return folder
    init = save_random_llama(work / "teacher-init", tokenizer, layers=2, hidden=64, seed=200)
    recipe = parse_recipe(
        {
            "name": "teacher",
            "task": "causal_lm",
            "student": {"model": str(init)},
            "data": {
                "format": "jsonl",
                "path": str(prompts),
                "mode": "teacher_generated",
                "chat_template": False,
                "max_length": 64,
                "test_fraction": 0.05,
                "generation": {"max_new_tokens": 40, "temperature": 1.0, "batch_size": 100, "model": str(oracle)},
            },
            "objective": [{"loss": "cross_entropy"}],
            "training": {
                "lr": 3e-3,
                "batch_size": 32,
                "steps": steps,
                "log_every": 50,
                "schedule": {"name": "cosine", "warmup_steps": 20},
                "device": "cpu",
            },
            "evaluation": COMMON_EVAL,
            "output": {"dir": str(work / "runs"), "overwrite": True},
        }
    )
    report = run_recipe(recipe)
    print(
        "teacher: perplexity on held-out oracle answers"
        f" {report['runs'][0]['models']['student']['metrics']['perplexity']:.2f}"
    )
    return folder


def student_run(work, tokenizer, oracle, teacher, prompts, *, mode, seed, args, steps_per_epoch) -> dict:
    init = work / f"student-init-{seed}"
    if not (init / "config.json").exists():
        save_random_llama(init, tokenizer, layers=1, hidden=64, seed=300 + seed)
    test_fraction = args.test_prompts / (args.train_prompts + args.test_prompts)
    recipe = parse_recipe(
        {
            "name": f"student-{mode}-seed{seed}",
            "task": "causal_lm",
            "teacher": {"model": str(teacher)},
            "student": {"model": str(init)},
            "data": {
                "format": "jsonl",
                "path": str(prompts),
                "mode": mode,
                "chat_template": False,
                "max_length": 64,
                "test_fraction": test_fraction,
                "generation": {"max_new_tokens": 40, "temperature": 1.0, "batch_size": 64, "seed": seed},
                "monitor": {"golden": str(oracle), "examples": args.test_prompts},
                "samples": 0,
            },
            "objective": [{"loss": "forward_kl"}],
            "training": {
                "lr": args.lr,
                "batch_size": args.batch_size,
                "steps": args.epochs * steps_per_epoch,
                "log_every": steps_per_epoch,
                "eval_every": steps_per_epoch,
                "seed": seed,
                "device": "cpu",
            },
            "evaluation": {**COMMON_EVAL, "baseline": False},
            "output": {"dir": str(work / "runs"), "overwrite": True},
        }
    )
    started = time.perf_counter()
    report = run_recipe(recipe)
    student = report["runs"][0]["models"]["student"]
    hack = student["train"]["teacher_hacking"]
    # the monitor evaluates at every eval_every step before the last; the final evaluation
    # (the same held-out split, the same two metrics) is in the student's test metrics
    steps = [*hack["steps"], student["train"]["steps"]]
    proxy = [*hack["proxy_values"], student["metrics"]["proxy_kl"]]
    golden = [*hack["golden_values"], student["metrics"]["golden_kl"]]
    best = min(range(len(golden)), key=golden.__getitem__)
    return {
        "mode": mode,
        "seed": seed,
        "steps": steps,
        "proxy": proxy,
        "golden": golden,
        "flagged": hack["flagged"],
        "monitor": {k: v for k, v in hack.items() if not k.endswith("_values") and k != "steps"},
        "best_golden": golden[best],
        "best_golden_step": steps[best],
        "final_golden": golden[-1],
        "final_proxy": proxy[-1],
        "best_proxy": min(proxy),
        "perplexity": student["metrics"]["perplexity"],
        "seconds": time.perf_counter() - started,
    }


def plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    colors = {"teacher_generated": "tab:red", "online_generation": "tab:blue"}
    seen = set()
    for r in results:
        for ax, key in zip(axes, ("proxy", "golden")):
            label = LABEL[r["mode"]] if (r["mode"], key) not in seen else None
            seen.add((r["mode"], key))
            ax.plot(r["steps"], r[key], color=colors[r["mode"]], alpha=0.9, lw=1.5, label=label)
            if key == "golden":
                ax.scatter([r["best_golden_step"]], [r["best_golden"]], color=colors[r["mode"]], s=18, zorder=3)
    axes[0].set_title("proxy: KL(teacher || student), held-out")
    axes[1].set_title("golden: KL(oracle || student), held-out (dot: best)")
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("nats / token")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"figure: {path}")


def table(results: list[dict], steps_per_epoch: int) -> str:
    lines = [
        "| data | seed | final golden_kl | best golden_kl (step, epoch) | final proxy_kl | best proxy_kl"
        " | test perplexity | monitor flagged | train s |",
        "|---|---:|---:|---:|---:|---:|---:|:-:|---:|",
    ]
    for r in results:
        epoch = r["best_golden_step"] / steps_per_epoch
        lines.append(
            f"| {LABEL[r['mode']]} | {r['seed']} | {r['final_golden']:.4f} | {r['best_golden']:.4f}"
            f" ({r['best_golden_step']}, {epoch:g}) | {r['final_proxy']:.4f} | {r['best_proxy']:.4f}"
            f" | {r['perplexity']:.2f} | {'yes' if r['flagged'] else 'no'} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0", help="comma-separated")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--train-prompts", type=int, default=64)
    parser.add_argument("--test-prompts", type=int, default=32)
    parser.add_argument("--teacher-prompts", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--oracle-steps", type=int, default=600)
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (kept; reuses oracle and teacher)")
    parser.add_argument("--png", type=Path, default=here / "teacher_hacking.png")
    parser.add_argument("--json", type=Path, default=None, help="summary JSON; default WORK/teacher_hacking.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    work = args.work or Path(tempfile.mkdtemp(prefix="kdforge-teacher-hacking-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("KDFORGE_CACHE_DIR", str(work / "cache"))
    started = time.perf_counter()

    text = data_file().read_text(encoding="utf-8")
    oracle_text = work / "oracle_text.txt"
    oracle_text.write_text(text[:ORACLE_CHARS])
    tokenizer = make_tokenizer(text[:ORACLE_CHARS], vocab_size=512, chat_template=False)
    tokenizer.bos_token = None  # the oracle learns packed text, which has no BOS: prompts start without one

    prompts = speech_prompts(text[ORACLE_CHARS:])
    n_student = args.train_prompts + args.test_prompts
    if len(prompts) < n_student + args.teacher_prompts:
        raise SystemExit(f"only {len(prompts)} prompts in the text; ask for fewer")
    student_prompts = write_jsonl(work / "student_prompts.jsonl", prompts[:n_student])
    teacher_prompts = write_jsonl(work / "teacher_prompts.jsonl", prompts[-args.teacher_prompts :])

    oracle = train_oracle(work, tokenizer, oracle_text, args.oracle_steps)
    teacher = train_teacher(work, tokenizer, oracle, teacher_prompts, args.teacher_steps)
    print(f"oracle and teacher ready after {time.perf_counter() - started:.0f} s")

    steps_per_epoch = -(-args.train_prompts // args.batch_size)
    results = []
    for seed in seeds:
        for mode in MODES:
            r = student_run(
                work, tokenizer, oracle, teacher, student_prompts,
                mode=mode, seed=seed, args=args, steps_per_epoch=steps_per_epoch,
            )  # fmt: skip
            print(
                f"{mode} seed {seed}: golden best {r['best_golden']:.4f} at step {r['best_golden_step']},"
                f" final {r['final_golden']:.4f}; proxy final {r['final_proxy']:.4f};"
                f" flagged {r['flagged']} ({r['seconds']:.0f} s)"
            )
            results.append(r)

    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    title = (
        f"kdforge {commit}: oracle 4L/128 -> teacher 2L/64 -> student 1L/64, forward_kl, "
        f"{args.train_prompts} train / {args.test_prompts} held-out prompts, {args.epochs} epochs, "
        f"seeds {args.seeds}"
    )
    plot(results, args.png, title)
    summary = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "steps_per_epoch": steps_per_epoch,
        "seconds": time.perf_counter() - started,
        "results": results,
    }
    json_path = args.json or work / "teacher_hacking.json"
    json_path.write_text(json.dumps(summary, indent=2))
    print(table(results, steps_per_epoch))
    print(f"total {time.perf_counter() - started:.0f} s; work folder {work}; summary {json_path}")


if __name__ == "__main__":
    main()
