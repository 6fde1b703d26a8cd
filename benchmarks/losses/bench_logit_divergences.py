"""Peak memory and time of the logit divergences, forward + backward, on CPU.

For each divergence of ``kdforge.losses`` (forward_kl, reverse_kl, generalized_jsd,
skew_kl, skew_reverse_kl, total_variation, and taid at t = 0.5) and each implementation:

* ``fused``: kdforge as shipped: positions in chunks of ``CHUNK_ELEMENTS`` logits, the
  gradient in closed form on four reused chunk buffers (``kdforge.losses.chunking``);
* ``chunked-autograd``: the same chunks, but each chunk's formula differentiated by
  autograd (recomputed in the backward pass, gradient written into one buffer): what
  kdforge shipped before the fused kernels;
* ``plain``: the same formula under autograd on the whole tensor at once (what one
  writes without chunking);
* ``trl``: for generalized_jsd only, ``trl.experimental.gkd.GKDTrainer.generalized_jsd_loss``;
* ``fused@N`` (extra rows, ``--extra-chunk N``): the fused path with ``CHUNK_ELEMENTS = N``;

a fresh subprocess allocates the inputs (student logits with requires_grad, teacher
logits without), records its resident set after a gc, runs one forward + backward,
and reports the extra peak resident memory (peak - baseline, with the kernel's
peak counter reset just before the run; the student's gradient, 1x, is part of
it). The same subprocess then times ``--repeats`` more forward + backward passes
(median). The parent prints a markdown table, the git commit and a hash of the
loss sources, and warns if they changed between rows.

Resident memory is what the process got from glibc malloc: allocations under its
dynamic mmap threshold (at most 32 MiB) come from the heap and are not always given
back when freed. Setting ``MALLOC_MMAP_THRESHOLD_=65536`` in the environment (the
workers inherit it) maps every allocation of 64 KiB or more separately, so the peak
tracks live tensors.

    .venv/bin/python benchmarks/losses/bench_logit_divergences.py           # [8, 512, 49152]
    .venv/bin/python benchmarks/losses/bench_logit_divergences.py --quick   # [4, 128, 49152], smoke
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for proc_memory
from proc_memory import reset_peak, status_kb  # noqa: E402

DIVERGENCES = [
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "skew_kl",
    "skew_reverse_kl",
    "total_variation",
    "taid",
]
WHOLE = 1 << 40  # CHUNK_ELEMENTS that makes every input one chunk
PARAMS = {
    "generalized_jsd": {"beta": 0.5},
    "skew_kl": {"alpha": 0.1},
    "skew_reverse_kl": {"alpha": 0.1},
    "taid": {"t": 0.5},
}
TARGET = 1.5  # the target: extra peak < 1.5 x one float32 logits tensor


# ---------------------------------------------------------------- worker side


def _loss_fn(divergence: str, impl: str):
    if impl == "trl":
        if divergence != "generalized_jsd":
            raise ValueError("trl implements generalized_jsd only")
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer

        # reduction "batchmean" divides by B, kdforge by B*L: a constant factor, same work
        return lambda s, t: GKDTrainer.generalized_jsd_loss(s, t, beta=0.5, temperature=1.0)

    import kdforge.losses as losses
    from kdforge.losses import chunking
    from kdforge.losses.common import masked_mean
    from kdforge.losses.logits import KERNELS
    from kdforge.losses.taid import taid_kernel

    params = PARAMS.get(divergence, {})
    if impl == "fused":
        fn = losses.LOSSES.get(divergence).fn
        return lambda s, t: fn(s, t, **params)
    if impl.startswith("fused@"):
        chunking.CHUNK_ELEMENTS = int(impl.split("@", 1)[1])
        fn = losses.LOSSES.get(divergence).fn
        return lambda s, t: fn(s, t, **params)
    if impl not in ("chunked-autograd", "plain"):
        raise ValueError(f"unknown implementation {impl!r}")
    if impl == "plain":
        chunking.CHUNK_ELEMENTS = WHOLE
    kernel = taid_kernel(params["t"]) if divergence == "taid" else KERNELS[divergence](*params.values())
    # temperature 1 (the T^2 factor is 1), mean over positions: what the shipped functions compute
    return lambda s, t: masked_mean(chunking.per_position(s, t, kernel.formula, 1.0), None)


def _source_sha() -> str:
    """sha256 (12 hex) of the loss sources this process imports: rows of one table must agree."""
    import importlib

    # by module name: `kdforge.losses.taid` the attribute is the loss function (the public API), not its module
    chunking, logits, taid = (importlib.import_module(f"kdforge.losses.{n}") for n in ("chunking", "logits", "taid"))
    digest = hashlib.sha256()
    for module in (chunking, logits, taid):
        with open(module.__file__, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:12]


def _git_head() -> str:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src/kdforge/losses"], cwd=root, capture_output=True, text=True
        )
    except OSError:
        return "unknown"
    return head.stdout.strip() + (" (src/kdforge/losses modified)" if dirty.stdout.strip() else "")


def worker(divergence: str, impl: str, shape: list[int], repeats: int, threads: int | None) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    loss_fn = _loss_fn(divergence, impl)  # imports happen before the baseline

    gen = torch.Generator().manual_seed(0)
    student = (2.0 * torch.randn(*shape, generator=gen)).requires_grad_(True)
    teacher = 2.0 * torch.randn(*shape, generator=gen)
    tensor_kb = student.numel() * student.element_size() / 1024

    gc.collect()
    baseline_kb = status_kb("VmRSS")
    reset = reset_peak()

    # memory: one forward (peak read), then backward (peak read again)
    t0 = time.perf_counter()
    loss = loss_fn(student, teacher)
    fwd_peak_kb = status_kb("VmHWM")
    loss.backward()
    first_s = time.perf_counter() - t0
    peak_kb = status_kb("VmHWM")
    if not reset:  # fall back on the lifetime peak (includes import transients, if larger)
        import resource

        peak_kb = max(peak_kb, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    assert student.grad is not None and torch.isfinite(loss).item()
    loss_value = loss.item()
    del loss

    # time: fresh gradient each repeat, like the first pass
    times = []
    for _ in range(repeats):
        student.grad = None
        gc.collect()
        t0 = time.perf_counter()
        loss_fn(student, teacher).backward()
        times.append(time.perf_counter() - t0)

    return {
        "divergence": divergence,
        "impl": impl,
        "shape": shape,
        "loss": loss_value,
        "tensor_mb": tensor_kb * 1024 / 1e6,
        "baseline_mb": baseline_kb * 1024 / 1e6,
        "extra_fwd_mb": (fwd_peak_kb - baseline_kb) * 1024 / 1e6,
        "extra_mb": (peak_kb - baseline_kb) * 1024 / 1e6,
        "peak_reset": reset,
        "first_s": first_s,
        "times_s": times,
        "median_s": statistics.median(times) if times else first_s,
        "threads": torch.get_num_threads(),
        "logits_sha": _source_sha(),
    }


# ---------------------------------------------------------------- parent side


def run_case(divergence: str, impl: str, shape: list[int], repeats: int, threads: int | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", divergence, impl, "--shape", *map(str, shape)]
    cmd += ["--repeats", str(repeats)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"divergence": divergence, "impl": impl, "error": (proc.stderr or proc.stdout).strip()[-400:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict], repeats: int) -> str:
    ref = {r["divergence"]: r for r in results if r.get("impl") == "plain" and "error" not in r}
    lines = [
        "| divergence | implementation | extra peak fwd (MB) | extra peak fwd+bwd (MB) | x tensor "
        f"| < {TARGET}x | median fwd+bwd (s) | time / plain |",
        "|---|---|---:|---:|---:|:-:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['divergence']} | {r['impl']} | error: {r['error'].splitlines()[-1]} | | | | | |")
            continue
        multiple = r["extra_mb"] / r["tensor_mb"]
        base = ref.get(r["divergence"])
        ratio = f"{r['median_s'] / base['median_s']:.2f}" if base else "n/a"
        ok = "yes" if multiple < TARGET else "no"
        n = len(r["times_s"])
        timed = f"{r['median_s']:.2f}" + ("" if n == repeats else f" (n={n})")
        lines.append(
            f"| {r['divergence']} | {r['impl']} | {r['extra_fwd_mb']:.0f} | {r['extra_mb']:.0f} | {multiple:.2f} "
            f"| {ok} | {timed} | {ratio} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="smoke mode: logits [4, 128, 49152] (two chunks), 2 timed repeats"
    )
    parser.add_argument("--shape", type=int, nargs=3, default=None, help="B L V (default 8 512 49152)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed forward+backward passes (median; default 3, quick 2)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in the workers")
    parser.add_argument("--only", nargs="*", default=None, help="divergences to run (default all six)")
    parser.add_argument(
        "--extra-chunk",
        type=int,
        nargs="*",
        default=[],
        help="extra kdforge rows with CHUNK_ELEMENTS = N (e.g. 4194304)",
    )
    parser.add_argument(
        "--impls",
        nargs="*",
        default=["fused", "chunked-autograd", "plain", "trl"],
        help="implementations per divergence: fused, chunked-autograd, plain, trl (generalized_jsd only), fused@N",
    )
    parser.add_argument(
        "--extra-for", nargs="*", default=["forward_kl"], help="divergences that get the extra rows ('all': every one)"
    )
    parser.add_argument("--extra-repeats", type=int, default=1, help="timed passes of the extra rows")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--worker", nargs=2, metavar=("DIVERGENCE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    shape = args.shape or ([4, 128, 49152] if args.quick else [8, 512, 49152])
    if args.repeats is None:
        args.repeats = 2 if args.quick else 3
    if args.worker:
        print(json.dumps(worker(*args.worker, shape, args.repeats, args.threads)))
        return

    import torch

    import kdforge.losses.chunking as chunking

    divergences = args.only or DIVERGENCES
    cases = []  # (divergence, implementation, timed repeats)
    for d in divergences:
        cases += [(d, impl, args.repeats) for impl in args.impls if impl != "trl" or d == "generalized_jsd"]
        if d in args.extra_for or "all" in args.extra_for:
            cases += [(d, f"fused@{n}", args.extra_repeats) for n in args.extra_chunk]

    head, sha = _git_head(), _source_sha()
    print(
        f"# logits {shape} float32, {args.repeats} timed repeats; torch {torch.__version__}, "
        f"nproc {os.cpu_count()}, shipped CHUNK_ELEMENTS = {chunking.CHUNK_ELEMENTS}; git {head}, sources {sha}",
        file=sys.stderr,
    )
    results = []
    start = time.perf_counter()
    for d, impl, repeats in cases:
        r = run_case(d, impl, shape, repeats, args.threads)
        results.append(r)
        if "error" in r:
            print(f"{d:16s} {impl:18s} ERROR {r['error']}", file=sys.stderr)
        else:
            print(
                f"{d:16s} {impl:18s} extra {r['extra_mb']:7.0f} MB ({r['extra_mb'] / r['tensor_mb']:.2f}x)"
                f" fwd {r['extra_fwd_mb']:6.0f} MB"
                f"  median {r['median_s']:.2f} s  [{time.perf_counter() - start:.0f} s]",
                file=sys.stderr,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    tensor_mb = results[0].get("tensor_mb", float("nan")) if results else float("nan")
    print(f"\nlogits {shape} float32; one tensor = {tensor_mb:.0f} MB; total {time.perf_counter() - start:.0f} s")
    shas = {r.get("logits_sha") for r in results if "error" not in r} | {sha, _source_sha()}
    if len(shas) > 1:
        print(f"WARNING: the loss sources changed during the run ({sorted(shas)}); rows differ in code")
    print(f"git {head} at the start; sources sha256 {sha}; torch {torch.__version__}; nproc {os.cpu_count()}\n")
    print(table(results, args.repeats))


if __name__ == "__main__":
    main()
