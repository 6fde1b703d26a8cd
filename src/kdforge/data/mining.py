"""Hard negatives mined with the teacher's embeddings, for distilling a ranker.

A dense retriever learns most from negatives that a strong model already ranks
high: documents that look relevant but are not labelled as such. The usual
practice (ANCE, Xiong et al. 2021; TAS-B, Hofstätter et al. 2021; RocketQA, Qu et
al. 2021) is to retrieve each training query's nearest documents with the
teacher, drop the labelled positives, and keep the best-scoring rest as that
query's negatives. Because collections are sparsely labelled, the very top of
that list holds many unlabelled relevant documents (false negatives); RocketQA
skips or denoises them, which ``skip_top`` does here in its simplest form.

The teacher then scores each (query, positive, negative) triple; the margin
``t(q, pos) - t(q, neg)`` is the distillation target of Margin-MSE and what
:mod:`kdforge.data.tasb` balances its pair sampling over.
"""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np


def _as_faiss(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-d array [rows, dim], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} holds NaN or infinite values")
    # faiss reads raw C-contiguous float32 buffers only
    return np.ascontiguousarray(x, dtype=np.float32)


def mine_negatives(
    query_emb: np.ndarray,
    doc_emb: np.ndarray,
    positives: Sequence[set[int]],
    k: int,
    *,
    skip_top: int = 0,
) -> np.ndarray:
    """Each query's ``k`` best-scoring non-positive documents under the teacher.

    Args:
        query_emb: [Q, D] teacher query embeddings.
        doc_emb: [N, D] teacher document embeddings; the score is the inner product
            (normalise both beforehand for cosine).
        positives: Q sets of document indices labelled relevant to each query; they
            are never returned as that query's negatives.
        k: negatives per query.
        skip_top: how many of the best-scoring non-positive documents to pass over
            before taking ``k``, a guard against unlabelled relevant documents
            (false negatives), which crowd the very top of the list.

    Returns:
        [Q, k] int64 document indices, each row in decreasing teacher score.

    Raises:
        ValueError: on mismatched shapes, positives outside ``[0, N)``, or a query
            with fewer than ``k + skip_top`` non-positive documents.
    """
    queries = _as_faiss(query_emb, "query_emb")
    docs = _as_faiss(doc_emb, "doc_emb")
    n_queries, n_docs = len(queries), len(docs)
    if queries.shape[1] != docs.shape[1]:
        raise ValueError(f"query_emb has dim {queries.shape[1]} but doc_emb has dim {docs.shape[1]}")
    if len(positives) != n_queries:
        raise ValueError(f"positives has {len(positives)} entries for {n_queries} queries")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if skip_top < 0:
        raise ValueError(f"skip_top must be >= 0, got {skip_top}")
    positive_sets = [{int(p) for p in pos} for pos in positives]
    for q, pos in enumerate(positive_sets):
        if pos and (min(pos) < 0 or max(pos) >= n_docs):
            raise ValueError(f"query {q} has a positive outside [0, {n_docs})")
        available = n_docs - len(pos) - skip_top
        if available < k:
            raise ValueError(
                f"query {q} has {n_docs - len(pos)} non-positive documents; "
                f"k={k} with skip_top={skip_top} needs {k + skip_top}"
            )
    out = np.empty((n_queries, k), dtype=np.int64)
    if n_queries == 0:
        return out

    # Each query loses at most all its positives before the rank it needs, so this
    # depth always holds k + skip_top non-positives (checked above that N suffices).
    max_pos = max(len(pos) for pos in positive_sets)
    depth = min(n_docs, k + skip_top + max_pos)
    index = faiss.IndexFlatIP(docs.shape[1])
    index.add(docs)
    _, ranked = index.search(queries, depth)

    # Membership of (query, doc) in the labelled positives, tested for the whole
    # [Q, depth] result at once through one int64 key per pair.
    pos_keys = np.fromiter(
        (q * n_docs + d for q, pos in enumerate(positive_sets) for d in pos),
        dtype=np.int64,
    )
    row_keys = np.arange(n_queries, dtype=np.int64)[:, None] * n_docs + ranked
    is_positive = np.isin(row_keys, pos_keys)
    # A stable sort on the flag moves each row's non-positives to the front in rank order.
    order = np.argsort(is_positive, axis=1, kind="stable")[:, skip_top : skip_top + k]
    out[:] = np.take_along_axis(ranked, order, axis=1)
    return out


def teacher_margins(pos_scores: np.ndarray, neg_scores: np.ndarray) -> np.ndarray:
    """The teacher's margin per pair, ``t(q, pos) - t(q, neg)``.

    Args:
        pos_scores: [P] teacher scores of each pair's positive.
        neg_scores: [P] teacher scores of each pair's negative (or [P, n] for
            several negatives per positive, giving [P, n] margins).

    Returns:
        float64 margins, of the broadcast shape.
    """
    pos = np.asarray(pos_scores, dtype=np.float64)
    neg = np.asarray(neg_scores, dtype=np.float64)
    if neg.ndim == pos.ndim + 1:
        pos = pos[..., None]  # one positive against each of its negatives
    if pos.shape[0] != neg.shape[0]:
        raise ValueError(f"{pos.shape[0]} positive scores but {neg.shape[0]} negative scores")
    return pos - neg
