"""Fused linear divergences against today's path: peak memory and time of the loss, forward + backward, on CPU.

The loss of a causal LM's training step, from the student's last hidden states ``[B, L, H]``
(with a gradient) and its LM head ``[V, H]`` (with a gradient), against a teacher:

* ``logits``: what kdforge did before issue 22: the head computes the ``[B, L, V]`` logits
  (autograd), then the fused logit divergence of ``kdforge.losses.chunking`` (its gradient
  buffer the size of the logits); the backward pass runs through the head's matmul;
* ``linear``: ``HeadLogits`` (``kdforge.losses.linear``): chunk by chunk, the logits, the
  value and the gradient to the hidden states and the head, no ``[B, L, V]`` tensor;
* ``linear+head``: the same with the teacher given as hidden states and a head too (an
  online teacher of the fused path), so no teacher logits exist either.

The teacher of ``logits`` and ``linear`` is a ``[B, L, V]`` float32 logits tensor allocated
before the baseline (a teacher that hands logits over holds them whatever the student does).
Each case runs in a fresh subprocess: inputs allocated, gc, baseline ``VmRSS``, the kernel's
peak counter reset, one forward + backward, ``VmHWM``. **Extra peak** = peak - baseline,
the head's weight gradient and the hidden states' gradient included; ``x tensor`` divides it
by one ``[B, L, V]`` float32 tensor. Then ``--repeats`` more passes are timed (median);
``time / logits`` is the ratio to the ``logits`` row of the same loss in the same run.

    .venv/bin/python benchmarks/scale/bench_fused_linear.py                       # V = 49152, every loss
    .venv/bin/python benchmarks/scale/bench_fused_linear.py --vocab 151936 --losses forward_kl cross_entropy
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for proc_memory
from losses.bench_logit_divergences import DIVERGENCES, PARAMS  # noqa: E402
from proc_memory import reset_peak, status_kb  # noqa: E402

# the divergences and settings of benchmarks/losses/, and the label loss the fused path also serves
LOSSES = [*DIVERGENCES, "cross_entropy"]
TARGET = 0.25


def worker(loss: str, impl: str, batch: int, length: int, hidden: int, vocab: int, repeats: int) -> dict:
    import torch

    import kdforge.losses as losses
    from kdforge.losses.linear import HeadLogits

    fn = losses.LOSSES.get(loss).fn
    params = PARAMS.get(loss, {})
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(batch, length, hidden, generator=gen).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).requires_grad_(True)
    if loss == "cross_entropy":
        teacher = torch.randint(0, vocab, (batch, length), generator=gen)
    elif impl == "linear+head":
        teacher = HeadLogits(
            torch.randn(batch, length, hidden, generator=gen), torch.randn(vocab, hidden, generator=gen) / hidden**0.5
        )
    else:
        teacher = torch.randn(batch, length, vocab, generator=gen) * 2.0

    def step():
        student = h @ w.T if impl == "logits" else HeadLogits(h, w)
        value = fn(student, teacher, **params)
        value.backward()
        return value

    gc.collect()
    baseline_kb = status_kb("VmRSS")
    reset = reset_peak()
    t0 = time.perf_counter()
    value = step()
    first_s = time.perf_counter() - t0
    peak_kb = status_kb("VmHWM")
    if not reset:
        import resource

        peak_kb = max(peak_kb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    times = []
    for _ in range(repeats):
        h.grad = w.grad = None
        gc.collect()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    tensor_mb = batch * length * vocab * 4 / 1e6
    return {
        "loss": loss,
        "impl": impl,
        "shape": [batch, length, hidden, vocab],
        "value": float(value),
        "tensor_mb": tensor_mb,
        "extra_mb": (peak_kb - baseline_kb) * 1024 / 1e6,
        "x_tensor": (peak_kb - baseline_kb) * 1024 / 1e6 / tensor_mb,
        "head_grad_mb": vocab * hidden * 4 / 1e6,
        "peak_reset": reset,
        "first_s": first_s,
        "times_s": times,
        "median_s": statistics.median(times) if times else first_s,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("LOSS", "IMPL"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=576)  # SmolLM2-135M's
    parser.add_argument("--vocab", type=int, default=49152)  # SmolLM2's
    parser.add_argument("--losses", nargs="*", default=LOSSES)
    parser.add_argument("--impls", nargs="*", default=["logits", "linear", "linear+head"])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    shape = [args.batch, args.length, args.hidden, args.vocab]
    if args.worker:
        print(json.dumps(worker(*args.worker, *shape, args.repeats)))
        return
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    rows = []
    for loss in args.losses:
        for impl in args.impls:
            if impl == "linear+head" and loss == "cross_entropy":
                continue  # labels: no teacher
            cmd = [sys.executable, __file__, "--worker", loss, impl, "--repeats", str(args.repeats)]
            cmd += [f"--{k}={v}" for k, v in zip(("batch", "length", "hidden", "vocab"), shape)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                row = {"loss": loss, "impl": impl, "error": proc.stderr.strip()[-400:]}
            else:
                row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    by = {(r["loss"], r["impl"]): r for r in rows if "error" not in r}
    print(f"shape [B, L, H, V] = {shape}; git {head}; target: extra peak <= {TARGET} x tensor, time <= logits")
    print("| loss | path | extra peak (MB) | x tensor | <= 0.25x | median fwd+bwd (s) | time / logits |")
    print("|---|---|---:|---:|:-:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['loss']} | {r['impl']} | error: {r['error'][-80:]} | | | | |")
            continue
        base = by.get((r["loss"], "logits"))
        ratio = f"{r['median_s'] / base['median_s']:.2f}" if base else "-"
        ok = "yes" if r["x_tensor"] <= TARGET else "no"
        cells = [
            r["loss"],
            r["impl"],
            f"{r['extra_mb']:.0f}",
            f"{r['x_tensor']:.2f}",
            ok,
            f"{r['median_s']:.2f}",
            ratio,
        ]
        print("| " + " | ".join(cells) + " |")
    if args.out:
        args.out.write_text(json.dumps({"git": head, "shape": shape, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
