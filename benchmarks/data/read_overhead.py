"""What reading SST-2 through Hugging Face ``datasets`` (issue 21) costs a run, against the old reader.

Goal of issue 21: "reading the data adds at most 5% to a run's wall time against today's
readers on SST-2", and "the datasets layer holds the data in memory at most once for
in-memory tasks".

    KDFORGE_DATA_DIR=../shared/data .venv/bin/python benchmarks/data/read_overhead.py --repeats 5 --run-repeats 3

Results go to ``benchmarks/data/results-read-overhead.json`` (``--json`` to change).

Readers, each repeat in a fresh subprocess (``--child``), taken in turn within a repeat so that
the machine's load falls on all alike:

- ``old``: the plain-Python reading of ``sst2/{train,dev,test}.tsv`` that kdforge shipped at
  ``7b16fe8`` (``kdforge.data.text_classification._read`` and ``LabelledTextSource.sets``),
  reproduced below in :func:`old_sst2_splits` as the reference;
- ``new-cold``: ``LabelledTextSource(TextClassData(dataset="sst2", train_limit=8000), tokens=None).splits()``
  with a fresh, empty ``KDFORGE_CACHE_DIR`` (``datasets`` parses the TSV files and writes its
  Arrow cache);
- ``new-warm``: the same with a ``KDFORGE_CACHE_DIR`` whose Arrow cache is already built (what
  every run after the first reads).

Each child first imports what a run imports anyway (torch, numpy, kdforge's text-classification
data module), then times the read alone. ``datasets`` is among those imports: kdforge's
``tasks.encoders`` imports sentence-transformers, which imports ``datasets`` (so did every
text-classification run at ``7b16fe8``), so its import is no new cost for this task; each child
times ``import datasets`` on its own, after torch, to show what it would cost a task that did not
import it already. The child's wall time as the parent sees it (interpreter start to exit) is
recorded too.

Memory, in the same children: ``ru_maxrss`` (``resource.getrusage(RUSAGE_SELF)``; resetting ``VmHWM``
resets it too, so it is read before the reset and after the read, and the larger kept), ``VmHWM`` after
the kernel's peak counter is reset just before the read (``/proc/self/clear_refs``), the resident
set before and after ``import datasets`` and after the read (anonymous and file-backed pages apart:
``datasets`` memory-maps its Arrow cache, whose pages count as resident when touched but are the
page cache's, not the process's), and an ``imports`` child that reads nothing (the baseline).
Linux carries the parent's peak into a child started with ``vfork`` + ``exec`` (its ``ru_maxrss``
starts at the parent's), so this parent imports nothing heavy.

Then the wall time of a real SST-2 run of the bundled recipe at reduced size (``RUN_SETTINGS``:
60 steps of 32, 2,000 training sentences, 200 validation and 500 test), ``--run-repeats`` times,
with the warm cache; overhead = (new read median - old read median) / run wall time median.

``--quick``: 2 repeats and 1 run (a smoke test).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
KDFORGE = ROOT / ".venv" / "bin" / "kdforge"
TRAIN_LIMIT = 8000
RUN_SETTINGS = [
    "training.epochs=null",
    "training.steps=60",
    "data.train_limit=2000",
    "data.test_limit=500",
    "data.validation_limit=200",
    "training.eval_every=null",
    "output.overwrite=true",
]

# ---- the reference: SST-2 as kdforge read it at 7b16fe8 (plain Python, no datasets) ----------------

SST2_NAMES = {"0": "negative", "1": "positive"}


def old_sst2_splits(folder: Path, train_limit: int | None, seed: int = 0) -> list[tuple[list[str], list[int]]]:
    """Train, validation (dev) and test as (texts, class indices), read and limited as at 7b16fe8."""
    import numpy as np

    def read(name: str) -> tuple[list[str], list[str]]:
        texts, labels = [], []
        with (folder / name).open(encoding="utf-8", errors="replace") as handle:
            lines = handle.read().splitlines()[1:]  # header
        for number, line in enumerate(lines, 2):
            if not line.strip():
                continue
            label, sep, text = line.partition("\t")
            label = SST2_NAMES.get(label.strip(), "")
            if not sep or not label or not text.strip():
                raise ValueError(f"{folder / name}:{number} is not a label<TAB>sentence line")
            texts.append(text.strip())
            labels.append(label.strip())
        return texts, labels

    train, validation, test = read("train.tsv"), read("dev.tsv"), read("test.tsv")
    if train_limit is not None and train_limit < len(train[0]):
        keep = np.sort(np.random.default_rng(seed).permutation(len(train[0]))[:train_limit])
        train = ([train[0][i] for i in keep], [train[1][i] for i in keep])
    index = {name: i for i, name in enumerate(sorted(set(train[1])))}
    return [(texts, [index[label] for label in labels]) for texts, labels in (train, validation, test)]


# ---- the children ----------------------------------------------------------------------------------------


def _status_kb() -> dict[str, int]:
    from proc_memory import status_kb

    out = {field: status_kb(field) for field in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


def _digest(splits: list[tuple[list[str], list[int]]]) -> dict[str, object]:
    """Sizes and a hash of what was read, to check that both readers give the same examples."""
    out: dict[str, object] = {}
    for name, (texts, labels) in zip(("train", "validation", "test"), splits):
        digest = hashlib.sha256(json.dumps([texts, labels]).encode()).hexdigest()[:16]
        out[name] = {"examples": len(texts), "text_bytes": sum(len(t.encode()) for t in texts), "sha256": digest}
    return out


def full_python_mb(folder: Path) -> float:
    """The size of one copy of all of SST-2 (train, dev, test, unlimited) as Python strings and lists."""
    total = 0
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        lines = (folder / name).read_text(encoding="utf-8", errors="replace").splitlines()[1:]
        texts = [line.partition("\t")[2].strip() for line in lines if line.strip()]
        total += sys.getsizeof(texts) + sum(sys.getsizeof(t) for t in texts) + sys.getsizeof([0] * len(texts))
    return total / 2**20


def child(kind: str) -> None:
    """One fresh process: imports, then (unless ``imports``) one read of SST-2; prints a JSON line."""
    import gc

    started = time.perf_counter()
    import numpy  # noqa: F401
    import torch  # noqa: F401

    t0 = time.perf_counter()
    import datasets  # noqa: F401 (sentence-transformers imports it with kdforge's tasks, at 7b16fe8 too)

    import_datasets = time.perf_counter() - t0
    from proc_memory import reset_peak

    import kdforge.tasks.text_data as text_data

    result: dict[str, object] = {"kind": kind, "imports_s": time.perf_counter() - started}
    result["import_datasets_s"] = import_datasets
    gc.collect()
    result["before"] = _status_kb()
    reset_peak()
    folder = Path(os.environ["KDFORGE_DATA_DIR"]) / "sst2"
    if kind == "old":
        t0 = time.perf_counter()
        splits = old_sst2_splits(folder, TRAIN_LIMIT)
        result["read_s"] = time.perf_counter() - t0
    elif kind in ("new-cold", "new-warm"):
        t0 = time.perf_counter()
        source = text_data.LabelledTextSource(text_data.TextClassData(dataset="sst2", train_limit=TRAIN_LIMIT), None)
        got = source.splits()
        result["read_s"] = time.perf_counter() - t0
        splits = [(list(part.texts), list(part.labels)) for part in (got.train, got.eval, got.test)]
    else:
        splits = []
    gc.collect()
    result["after"] = _status_kb()
    # resetting VmHWM resets ru_maxrss too: the process's peak is the larger of the readings before and after
    result["ru_maxrss_kb"] = max(result["before"]["ru_maxrss"], result["after"]["ru_maxrss"])
    if splits:
        result["data"] = _digest(splits)
    if kind == "old":  # after the measurements: what one copy of the whole set takes as Python objects
        result["one_copy_python_mb"] = full_python_mb(folder)
    print("RESULT " + json.dumps(result), flush=True)


# ---- the parent ------------------------------------------------------------------------------------------


def run_child(kind: str, cache: Path) -> dict:
    env = {**os.environ, "KDFORGE_CACHE_DIR": str(cache), "KDFORGE_PROGRESS": "0"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", kind], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"child {kind} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(line[len("RESULT ") :])
    result["process_s"] = wall
    return result


def run_recipe_once(out: Path, cache: Path) -> float:
    env = {**os.environ, "KDFORGE_CACHE_DIR": str(cache), "KDFORGE_PROGRESS": "0"}
    args = [str(KDFORGE), "run", "text_teacher_sst2"]
    for setting in [*RUN_SETTINGS, f"output.dir={out}"]:
        args += ["--set", setting]
    start = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"kdforge run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return wall


def med(rows: list[dict], key: str) -> float:
    return statistics.median(float(r[key]) for r in rows)


def mb(kb: float) -> float:
    return kb / 1024


def summarise(rows: dict[str, list[dict]], run_walls: list[float]) -> dict:
    summary: dict[str, Any] = {}
    base_after = med(rows["imports"], "ru_maxrss_kb")
    for kind in ("old", "new-cold", "new-warm"):
        r = rows[kind]
        summary[kind] = {
            "read_s_median": med(r, "read_s"),
            "read_s_all": [x["read_s"] for x in r],
            "process_s_median": med(r, "process_s"),
            "ru_maxrss_mb_median": mb(med(r, "ru_maxrss_kb")),
            "ru_maxrss_above_imports_mb": mb(med(r, "ru_maxrss_kb") - base_after),
            # peak during the read above the resident set just before it (VmHWM reset there)
            "read_peak_above_before_mb": mb(statistics.median(x["after"]["VmHWM"] - x["before"]["VmRSS"] for x in r)),
            "held_after_read_anon_mb": mb(statistics.median(x["after"]["RssAnon"] - x["before"]["RssAnon"] for x in r)),
            "held_after_read_file_mb": mb(statistics.median(x["after"]["RssFile"] - x["before"]["RssFile"] for x in r)),
        }
    summary["imports"] = {"ru_maxrss_mb_median": mb(base_after), "process_s_median": med(rows["imports"], "process_s")}
    every = [x for kind in rows for x in rows[kind]]
    summary["import_datasets_s_median"] = med(every, "import_datasets_s")
    summary["one_copy_python_mb"] = statistics.median(x["one_copy_python_mb"] for x in rows["old"])
    run = statistics.median(run_walls)
    old = summary["old"]["read_s_median"]
    summary["run"] = {"wall_s_median": run, "wall_s_all": run_walls}
    for kind in ("new-cold", "new-warm"):
        extra = summary[kind]["read_s_median"] - old
        summary[kind]["extra_read_s"] = extra
        summary[kind]["overhead_of_run"] = extra / run  # the goal: <= 0.05
        summary[kind]["overhead_vs_old_reader_run"] = extra / (run - extra)
        summary[kind]["goal_met"] = extra / run <= 0.05
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["old", "new-cold", "new-warm", "imports"], help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run-repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 repeats, 1 run: a smoke test")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results-read-overhead.json"))
    args = parser.parse_args()
    os.environ.setdefault("KDFORGE_DATA_DIR", str((ROOT / ".." / "shared" / "data").resolve()))
    if args.child:
        child(args.child)
        return
    if args.quick:
        args.repeats, args.run_repeats = 2, 1
    began = time.time()
    rows: dict[str, list[dict]] = {k: [] for k in ("old", "new-cold", "new-warm", "imports")}
    with tempfile.TemporaryDirectory(prefix="kdf-read-") as tmp:
        work = Path(tmp)
        warm = work / "warm-cache"
        run_child("new-cold", warm)  # builds the Arrow cache the warm reads and the runs use
        for i in range(args.repeats):
            for kind in ("old", "new-cold", "new-warm", "imports"):
                cache = warm if kind == "new-warm" else work / f"cold-{i}"
                rows[kind].append(run_child(kind, cache))
                if kind != "new-warm":
                    shutil.rmtree(cache, ignore_errors=True)
                print(f"repeat {i + 1}/{args.repeats} {kind}: read {rows[kind][-1].get('read_s', 0):.3f} s,"
                      f" process {rows[kind][-1]['process_s']:.2f} s", file=sys.stderr, flush=True)  # fmt: skip
        run_walls = []
        for i in range(args.run_repeats):
            run_walls.append(run_recipe_once(work / f"runs-{i}", warm))
            print(f"run {i + 1}/{args.run_repeats}: {run_walls[-1]:.1f} s", file=sys.stderr, flush=True)
    same = {k: rows["old"][0]["data"][k]["sha256"] == rows["new-warm"][0]["data"][k]["sha256"]
            for k in ("train", "validation", "test")}  # fmt: skip
    summary = summarise(rows, run_walls)
    load = os.getloadavg()
    result = {
        "command": "KDFORGE_DATA_DIR=../shared/data .venv/bin/python benchmarks/data/read_overhead.py"
        f" --repeats {args.repeats} --run-repeats {args.run_repeats}",
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(began)),
        "seconds": round(time.time() - began, 1),
        "git": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),  # fmt: skip
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "loadavg_end": load},
        "train_limit": TRAIN_LIMIT,
        "run_settings": RUN_SETTINGS,
        "same_examples_old_and_new": same,
        "data": {"old": rows["old"][0]["data"], "new": rows["new-warm"][0]["data"]},
        "summary": summary,
        "rows": rows,
    }
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)


def print_table(result: dict) -> None:
    s = result["summary"]
    print("| reader | read s, median (all) | process s | ru_maxrss MB"
          " | above imports MB | read peak above before MB | held after: anon / file MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for kind in ("old", "new-cold", "new-warm"):
        r = s[kind]
        runs = ", ".join(f"{x:.3f}" for x in r["read_s_all"])
        print(f"| {kind} | {r['read_s_median']:.3f} ({runs}) |"
              f" {r['process_s_median']:.2f} | {r['ru_maxrss_mb_median']:.0f} | {r['ru_maxrss_above_imports_mb']:.0f} |"
              f" {r['read_peak_above_before_mb']:.1f} | {r['held_after_read_anon_mb']:.1f} /"
              f" {r['held_after_read_file_mb']:.1f} |")  # fmt: skip
    print(f"| imports only | - | {s['imports']['process_s_median']:.2f} | {s['imports']['ru_maxrss_mb_median']:.0f}"
          " | 0 | - | - |")  # fmt: skip
    run = s["run"]
    print(f"\nrun wall s, median: {run['wall_s_median']:.1f} (all: {', '.join(f'{x:.1f}' for x in run['wall_s_all'])})")
    for kind in ("new-cold", "new-warm"):
        r = s[kind]
        print(f"{kind}: +{r['extra_read_s']:.3f} s = {100 * r['overhead_of_run']:.2f}% of the run"
              f" ({'met' if r['goal_met'] else 'NOT met'}: <= 5%)")  # fmt: skip
    print(f"same examples old/new: {result['same_examples_old_and_new']}")
    print(f"import datasets alone (after torch), median: {s['import_datasets_s_median']:.2f} s;"
          f" one copy of SST-2 as Python objects: {s['one_copy_python_mb']:.1f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
