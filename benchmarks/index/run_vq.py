# ruff: noqa: E501  (markdown table rows)
"""Distill-VQ vs faiss's own IVF-PQ (trained for reconstruction) on SciFact (issue 7), in one process.

For each index shape (``--opq`` off and on) one run of recipe ``distill_vq_scifact`` gives, on the
same collection (SciFact's corpus embedded by all-MiniLM-L6-v2) and test queries:

- ``teacher (flat)``: exact inner-product search of the uncompressed embeddings;
- ``faiss IVF-PQ``: the runner's ``baseline`` role of this task, the index as initialised, i.e.
  faiss's IVF-PQ trained for reconstruction (k-means), same code size;
- ``Distill-VQ``: the same index after distillation (the runner's ``student``).

Both indexes are then searched again at several nprobe values (``--nprobe``), each measured
the same way (median latency of one query at a time; the teacher's query encoding is not counted,
it is the same for every row). Memory ratio = flat bytes / index bytes (the serialised faiss
index, codebooks and centroids included) and code bytes per document (PQ code + 8-byte id).

    .venv/bin/python benchmarks/index/run_vq.py
    .venv/bin/python benchmarks/index/run_vq.py --table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KDFORGE_PROGRESS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import log, results_header  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--nlist", type=int, default=64)
    parser.add_argument("--m", type=int, default=48)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--corpus-limit", type=int, default=0, help="0: the full 5,183-document corpus")
    parser.add_argument("--opq", choices=["off", "on", "both"], default="both")
    parser.add_argument("--out", default="/tmp/kdforge-bench-vq")
    parser.add_argument("--results", default=str(HERE / "results-vq.json"))
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print_table(json.loads(Path(args.results).read_text()))
        return

    from kdforge.checks import load_recipe
    from kdforge.runner import run_recipe
    from kdforge.tasks import TASKS

    results = {**results_header("run_vq.py", args), "runs": {}}
    for opq in {"off": [False], "on": [True], "both": [False, True]}[args.opq]:
        name = "opq" if opq else "plain"
        extra = [f"data.test.corpus_limit={args.corpus_limit}"] if args.corpus_limit else []
        recipe = load_recipe(
            "distill_vq_scifact",
            [
                "training.steps=null",
                f"training.epochs={args.epochs}",
                f"student.nlist={args.nlist}",
                f"student.m={args.m}",
                f"student.opq={str(opq).lower()}",
                f"output.dir={args.out}",
                f"output.name={name}",
                "output.overwrite=true",
                *extra,
            ],
        )
        started = time.perf_counter()
        report = run_recipe(recipe)
        models = report["runs"][0]["models"]
        log(f"{name}: run took {time.perf_counter() - started:.0f} s")
        task = TASKS.get(recipe.task)(recipe)
        run_dir = recipe.run_dir
        loaded = {
            "faiss IVF-PQ": task.load_saved(run_dir / "baseline"),
            "Distill-VQ": task.load_saved(run_dir / "model"),
        }
        rows = {"teacher (flat)": models["teacher"]["metrics"]}
        for nprobe in args.nprobe:
            task.student_cfg = task.student_cfg.model_copy(update={"nprobe": nprobe})
            for label, model in loaded.items():
                rows[f"{label}, nprobe {nprobe}"] = task.evaluate(model, task.family.collection).metrics
                log(f"{name} {label} nprobe {nprobe}: {rows[f'{label}, nprobe {nprobe}']}")
        results["runs"][name] = {
            "collection": {
                "queries": len(task.family.collection.data.queries),
                "documents": len(task.family.collection.doc_ids),
            },
            "train_s": models["student"]["train"]["train_seconds"],
            "steps": models["student"]["train"]["steps"],
            "training": models["student"]["train"],
            "rows": rows,
        }
        Path(args.results).write_text(json.dumps(results, indent=2, default=str))
    results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    Path(args.results).write_text(json.dumps(results, indent=2, default=str))
    print_table(results)


def print_table(results) -> None:
    print(f"Command: `{results['command']}`; {results['machine']}; {results['started']}")
    for name, run in results["runs"].items():
        rows = run["rows"]
        teacher = rows["teacher (flat)"]
        print(
            f"\n{name} ({'OPQ + ' if name == 'opq' else ''}IVF-PQ), {run['collection']}, {run['steps']} steps, {run['train_s']:.0f} s of training"
        )
        print(
            "| index | nDCG@10 | Recall@100 | x teacher nDCG@10 | query ms | index bytes | memory ratio | code bytes / doc |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for label, m in rows.items():
            print(
                f"| {label} | {m['ndcg@10']:.4f} | {m['recall@100']:.4f} | {m['ndcg@10'] / teacher['ndcg@10']:.3f} | {m['query_ms']:.3f}"
                f" | {m['index_bytes']:.0f} | {teacher['index_bytes'] / m['index_bytes']:.1f} | {m['code_bytes_per_doc']:.0f} |"
            )


if __name__ == "__main__":
    main()
