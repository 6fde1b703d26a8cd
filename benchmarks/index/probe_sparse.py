"""Measurements behind numbers quoted for the sparse retriever (benchmarks/README.md, issue 7).

- BM25 (bm25s) on the full SciFact test split: English stemmer or none, k1/b 1.5/0.75 or 0.9/0.4;
- a tied MLM head on all-MiniLM-L6-v2: non-zero terms per abstract (first 32) by starting bias;
- document encoding through the MLM head: documents/s at 128 and 256 tokens (batch 32, after a warm-up),
  and the time of one training forward + backward over 24 documents of 256 tokens.

    .venv/bin/python benchmarks/index/probe_sparse.py
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KDFORGE_PROGRESS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import log  # noqa: E402


def main() -> None:
    import torch

    from kdforge.checks import load_recipe
    from kdforge.data.beir import load_beir
    from kdforge.eval.retrieval import retrieval_metrics
    from kdforge.models.bm25 import BM25Scorer, BM25Settings
    from kdforge.models.sparse_encoder import document_transformer, document_weights
    from kdforge.tasks import TASKS

    data = load_beir("scifact", "test", field="data.beir")
    query_ids = list(data.queries)
    for stemmer, k1, b in (("english", 1.5, 0.75), (None, 1.5, 0.75), ("english", 0.9, 0.4)):
        bm25 = BM25Scorer(data.corpus, BM25Settings(k1=k1, b=b, stemmer=stemmer))
        rows, scores = bm25.search([data.queries[q] for q in query_ids], 100)
        run = {
            q: {bm25.doc_ids[j]: float(s) for j, s in zip(rows[i], scores[i]) if s > 0} for i, q in enumerate(query_ids)
        }
        metrics = retrieval_metrics(data.qrels, run, ("ndcg@10", "recall@100"))
        log(f"BM25 full SciFact, stemmer {stemmer}, k1 {k1}, b {b}: {metrics}")

    recipe = load_recipe("sparse_retriever_scifact", ["output.dir=/tmp/kdforge-probe"])
    task = TASKS.get(recipe.task)(recipe)
    texts = list(data.corpus.values())[:32]
    for bias in (0.0, -5.0, -8.0, -10.0):
        student = task.build_student().eval()
        with torch.no_grad():
            document_transformer(student).auto_model.cls.predictions.bias.fill_(bias)
            weights = document_weights(student, task.family.tokens(texts, 256))
        log(f"head bias {bias}: {(weights > 0).sum(1).float().mean():.1f} non-zero terms per abstract")

    student = task.build_student().eval()
    for length in (128, 256):
        inputs = task.family.tokens(texts, length)
        with torch.no_grad():
            document_weights(student, inputs)
            started = time.perf_counter()
            document_weights(student, inputs)
        log(f"{length} tokens: {len(texts) / (time.perf_counter() - started):.1f} documents/s")
    student.train()
    inputs = task.family.tokens(texts[:24], 256)
    started = time.perf_counter()
    document_weights(student, inputs).sum().backward()
    log(f"forward + backward, 24 documents x 256 tokens: {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
