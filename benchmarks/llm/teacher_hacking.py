"""Teacher hacking (Tiapkin et al., 2025) at toy scale: a fixed offline set vs fresh generations.

Three tiny Llamas share one byte-level BPE tokenizer (512 tokens, trained on TinyShakespeare):

1. the **oracle** ("golden" model, 4 layers, hidden 128): trained by kdforge labels-only
   (cross-entropy, no teacher) on the first 200 KB of TinyShakespeare, packed text;
2. the **teacher** (2 layers, hidden 64): trained labels-only on the oracle's sampled
   answers to ``--teacher-prompts`` prompts (the ``teacher_generated`` method with
   ``generation.model`` = the oracle), so it is an imperfect copy of the oracle;
3. the **student** (1 layer, hidden 64, random init): distilled from the teacher with
   ``forward_kl`` (teacher online), with the teacher-hacking monitor
   (method ``teacher_hacking_monitor``, ``golden`` = the oracle) evaluating proxy_kl = KL(teacher || student) and
   golden_kl = KL(oracle || student) per token on ``--test-prompts`` held-out prompts
   (answered by the teacher) once per epoch.

Each ``--settings`` entry PROMPTS:EPOCHS trains on the first PROMPTS training prompts
(``data.train_limit``; the held-out prompts are the same in every setting) for EPOCHS
epochs, twice per seed, identical except for the method: ``teacher_generated`` (the
teacher answers each training prompt once; the same fixed set every epoch) and
``online_generation`` (fresh teacher answers every epoch). Epoch 0 of both is the same
stored set. A prompt is a speaker's name line plus the first line of the speech, ending in
a newline (so the answer starts a new line and the prompt/answer token boundary is the one
the models see in running text); student and teacher prompts come from disjoint parts of
the play text after the oracle's 200 KB.

The seed sets the student's initial weights, the data order (training.seed) and the
teacher's sampling (generation.seed). Everything runs on CPU in a work folder
(default a temp dir; ``--work`` keeps it, and reuses a trained oracle and teacher).

Writes ``teacher_hacking.png`` (proxy and golden vs epoch) next to this script (or
``--png``), a JSON summary into the work folder (or ``--json``), and prints a markdown table.

    .venv/bin/python benchmarks/llm/teacher_hacking.py          # 3 seeds; 64 prompts x 50 epochs, 16 x 200
    .venv/bin/python benchmarks/llm/teacher_hacking.py --seeds 0 --settings 64:50 --student-layers 2
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

from kdforge.checks import parse_recipe  # noqa: E402
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


def labels_only_recipe(
    name: str, init: Path, data: dict, steps: int, work: Path, methods: list | None = None, generation=None
):
    """A causal-LM run with no teacher: ``init`` trained on ``data`` with cross-entropy (oracle, teacher)."""
    return parse_recipe(
        {
            "name": name,
            "task": "causal_lm",
            "student": {"model": str(init)},
            "data": data,
            "generation": generation,
            "methods": methods or [],
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


def train_oracle(work: Path, tokenizer, text_path: Path, steps: int) -> Path:
    folder = work / "runs" / "oracle" / "model"
    if (folder / "config.json").exists():
        return folder
    init = save_random_llama(work / "oracle-init", tokenizer, layers=4, hidden=128, seed=100)
    data = {"format": "text", "path": str(text_path), "max_length": 64, "test_fraction": 0.05}
    recipe = labels_only_recipe("oracle", init, data, steps, work)
    report = run_recipe(recipe)
    print(f"oracle: test perplexity {report['runs'][0]['models']['student']['metrics']['perplexity']:.2f}")
    return folder


def train_teacher(work: Path, tokenizer, oracle: Path, prompts: Path, steps: int) -> Path:
    folder = work / "runs" / "teacher" / "model"
    if (folder / "config.json").exists():
        return folder
    init = save_random_llama(work / "teacher-init", tokenizer, layers=2, hidden=64, seed=200)
    data = {
        "format": "jsonl",
        "path": str(prompts),
        "chat_template": False,
        "max_length": 64,
        "test_fraction": 0.05,
    }
    writer = {"max_new_tokens": 40, "temperature": 1.0, "batch_size": 100, "model": str(oracle)}
    recipe = labels_only_recipe(
        "teacher", init, data, steps, work, methods=[{"name": "teacher_generated"}], generation=writer
    )
    report = run_recipe(recipe)
    print(
        "teacher: perplexity on held-out oracle answers"
        f" {report['runs'][0]['models']['student']['metrics']['perplexity']:.2f}"
    )
    return folder


def student_run(work, tokenizer, oracle, teacher, prompts, *, mode, seed, setting, args) -> dict:
    """One distillation run; ``setting`` = (training prompts used, epochs)."""
    n_train, epochs = setting
    layers, hidden = args.student_layers, args.student_hidden
    init = work / f"student-init-{layers}x{hidden}-{seed}"
    if not (init / "config.json").exists():
        save_random_llama(init, tokenizer, layers=layers, hidden=hidden, seed=300 + seed)
    steps_per_epoch = -(-n_train // args.batch_size)
    recipe = parse_recipe(
        {
            "name": f"student-{layers}x{hidden}-{n_train}p{epochs}e-{mode}-seed{seed}",
            "task": "causal_lm",
            "teacher": {"model": str(teacher)},
            "student": {"model": str(init)},
            "data": {
                "format": "jsonl",
                "path": str(prompts),
                "chat_template": False,
                "max_length": 64,
                # the same held-out prompts in every setting; a setting trains on the first n_train of the rest
                "test_fraction": args.test_prompts / (args.train_prompts + args.test_prompts),
                "train_limit": n_train,
                "samples": 0,
            },
            "generation": {"max_new_tokens": 40, "temperature": 1.0, "batch_size": 64, "seed": seed},
            # mode: the method that writes the training answers (teacher_generated or online_generation)
            "methods": [
                {"name": mode},
                {"name": "teacher_hacking_monitor", "golden": str(oracle), "examples": args.test_prompts},
            ],
            "objective": [{"loss": "forward_kl"}],
            "training": {
                "lr": args.lr,
                "batch_size": args.batch_size,
                "steps": epochs * steps_per_epoch,
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
    # since 3e8df65 the monitor's series ends with an evaluation after the last step; before
    # that, the final point (the same held-out split, the same metrics) came from the test metrics
    steps, proxy, golden = list(hack["steps"]), list(hack["proxy_values"]), list(hack["golden_values"])
    if not steps or steps[-1] < student["train"]["steps"]:
        steps.append(student["train"]["steps"])
        proxy.append(student["metrics"]["proxy_kl"])
        golden.append(student["metrics"]["golden_kl"])
    best = min(range(len(golden)), key=golden.__getitem__)
    return {
        "setting": f"{n_train} prompts x {epochs} epochs",
        "train_prompts": n_train,
        "epochs": epochs,
        "steps_per_epoch": steps_per_epoch,
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

    settings = list(dict.fromkeys(r["setting"] for r in results))
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 3.6 * len(settings)), squeeze=False)
    colors = {"teacher_generated": "tab:red", "online_generation": "tab:blue"}
    for row, setting in zip(axes, settings):
        seen = set()
        for r in (r for r in results if r["setting"] == setting):
            epochs = [s / r["steps_per_epoch"] for s in r["steps"]]
            for ax, key in zip(row, ("proxy", "golden")):
                label = LABEL[r["mode"]] if (r["mode"], key) not in seen else None
                seen.add((r["mode"], key))
                ax.plot(epochs, r[key], color=colors[r["mode"]], alpha=0.75, lw=1.2, label=label)
                if key == "golden":
                    best = r["best_golden_step"] / r["steps_per_epoch"]
                    ax.scatter([best], [r["best_golden"]], color=colors[r["mode"]], s=16, zorder=3)
        row[0].set_title(f"{setting}: proxy KL(teacher || student)", fontsize=10)
        row[1].set_title(f"{setting}: golden KL(oracle || student), dot = best", fontsize=10)
        for ax, key in zip(row, ("proxy", "golden")):
            # the first epochs fall from ~2 nats; the late ones are what hacking is about
            late = [v for r in results if r["setting"] == setting for s, v in zip(r["steps"], r[key])
                    if s >= 0.2 * r["steps"][-1]]  # fmt: skip
            span = max(late) - min(late)
            ax.set_ylim(min(late) - 0.1 * span, max(late) + 0.3 * span)
            ax.set_xlabel("epoch")
            ax.set_ylabel("nats / token (held-out)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def table(results: list[dict]) -> str:
    lines = [
        "| setting | data | seed | final golden_kl | best golden_kl (epoch) | golden rise after best"
        " | final proxy_kl | best proxy_kl | monitor flagged | train s |",
        "|---|---|---:|---:|---:|---:|---:|---:|:-:|---:|",
    ]
    for r in results:
        epoch = r["best_golden_step"] / r["steps_per_epoch"]
        rise = r["final_golden"] / r["best_golden"] - 1
        lines.append(
            f"| {r['setting']} | {LABEL[r['mode']]} | {r['seed']} | {r['final_golden']:.4f}"
            f" | {r['best_golden']:.4f} ({epoch:g}) | {100 * rise:+.1f}% | {r['final_proxy']:.4f}"
            f" | {r['best_proxy']:.4f} | {'yes' if r['flagged'] else 'no'} | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def mean_table(results: list[dict]) -> str:
    def stat(values: list[float]) -> str:
        t = torch.tensor(values, dtype=torch.float64)
        return f"{float(t.mean()):.4f} ± {float(t.std()):.4f}" if len(values) > 1 else f"{values[0]:.4f}"

    lines = [
        "| setting | data | seeds | final golden_kl | best golden_kl | final proxy_kl | flagged |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for setting in dict.fromkeys(r["setting"] for r in results):
        for mode in MODES:
            rs = [r for r in results if r["setting"] == setting and r["mode"] == mode]
            lines.append(
                f"| {setting} | {LABEL[mode]} | {len(rs)} | {stat([r['final_golden'] for r in rs])}"
                f" | {stat([r['best_golden'] for r in rs])} | {stat([r['final_proxy'] for r in rs])}"
                f" | {sum(r['flagged'] for r in rs)}/{len(rs)} |"
            )
    return "\n".join(lines)


def main() -> None:
    here = Path(__file__).resolve().parent
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated")
    parser.add_argument(
        "--settings", default="64:50,16:200", help="PROMPTS:EPOCHS,... (training prompts used, epochs over them)"
    )
    parser.add_argument("--train-prompts", type=int, default=64, help="training prompts written (the most used)")
    parser.add_argument("--test-prompts", type=int, default=32)
    parser.add_argument("--teacher-prompts", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--student-layers", type=int, default=1)
    parser.add_argument("--student-hidden", type=int, default=64)
    parser.add_argument("--oracle-steps", type=int, default=600)
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core machine)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (kept; reuses oracle and teacher)")
    parser.add_argument("--png", type=Path, default=here / "teacher_hacking.png")
    parser.add_argument("--json", type=Path, default=None, help="summary JSON; default WORK/teacher_hacking.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    settings = [tuple(int(x) for x in s.split(":")) for s in args.settings.split(",")]
    if any(n > args.train_prompts for n, _ in settings):
        raise SystemExit("a setting uses more prompts than --train-prompts")
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

    results = []
    for setting in settings:
        for seed in seeds:
            for mode in MODES:
                r = student_run(
                    work, tokenizer, oracle, teacher, student_prompts,
                    mode=mode, seed=seed, setting=setting, args=args,
                )  # fmt: skip
                print(
                    f"{r['setting']}, {mode}, seed {seed}: golden best {r['best_golden']:.4f} at step"
                    f" {r['best_golden_step']}, final {r['final_golden']:.4f}; proxy final {r['final_proxy']:.4f};"
                    f" flagged {r['flagged']} ({r['seconds']:.0f} s)",
                    flush=True,
                )
                results.append(r)

    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    title = (
        f"kdforge {commit}: oracle 4L/128 -> teacher 2L/64 -> student {args.student_layers}L/{args.student_hidden},"
        f" forward_kl, lr {args.lr:g}, batch {args.batch_size}, {args.test_prompts} held-out prompts,"
        f" seeds {args.seeds}"
    )
    plot(results, args.png, title)
    summary = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": time.perf_counter() - started,
        "results": results,
    }
    json_path = args.json or work / "teacher_hacking.json"
    json_path.write_text(json.dumps(summary, indent=2))
    print(table(results))
    print()
    print(mean_table(results))
    print(f"total {time.perf_counter() - started:.0f} s; work folder {work}; summary {json_path}")


if __name__ == "__main__":
    main()
