"""Retrieval evaluation: exact dense search, IR metrics, candidate ranking, encoder speed.

Conventions:

- An *encoder* is a callable ``texts -> array [N, D]`` (one row per text, any float
  dtype); it is called on batches of texts. Scores are inner products, so an encoder
  that wants cosine similarity normalises its rows itself.
- A *run* is ``{query id: {doc id: score}}``, higher is better; *qrels* are
  ``{query id: {doc id: graded relevance}}``, where only relevance > 0 counts as relevant.
- Metric names follow ranx and come back as given: ``"ndcg@10"``, ``"recall@100"``,
  ``"mrr@10"``, ``"map"``, ``"mrr"``. nDCG uses linear gain (relevance / log2(rank + 1)),
  as trec_eval and BEIR do.
- Speeds follow :mod:`kdforge.eval.speed`: one untimed warm-up, then the median of
  ``repeats`` timings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal, overload

import faiss
import numpy as np

from kdforge.data.beir import BeirData, WikiQAQuestion, wikiqa_to_beir
from kdforge.eval.speed import throughput

#: what a dense retrieval evaluation reports by default (BEIR's headline metric first)
DEFAULT_METRICS = ("ndcg@10", "recall@100", "mrr@10")
#: what answer-sentence selection (WikiQA) reports: the whole pool is ranked, no cutoff
RANKING_METRICS = ("map", "mrr")

Encoder = Callable[[list[str]], np.ndarray]
#: (query, its candidate texts) -> one score per candidate, higher is better (a cross-encoder)
PairScorer = Callable[[str, list[str]], Sequence[float]]
Run = dict[str, dict[str, float]]


def _as_matrix(array, name: str) -> np.ndarray:
    """``array`` as C-contiguous float32 [N, D], the only layout faiss accepts."""
    matrix = np.ascontiguousarray(np.asarray(array), dtype=np.float32)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [N, D]; got shape {matrix.shape}")
    return matrix


def flat_ip_index(doc_emb: np.ndarray) -> faiss.IndexFlatIP:
    """An exact inner-product faiss index over ``doc_emb`` [N, D]; row ``i`` is result id ``i``."""
    docs = _as_matrix(doc_emb, "doc_emb")
    index = faiss.IndexFlatIP(docs.shape[1])
    index.add(docs)
    return index


def search(query_emb: np.ndarray, doc_emb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` documents per query by inner product.

    ``query_emb`` [Q, D] and ``doc_emb`` [N, D] are cast to float32. Returns ``(scores,
    indices)``, both [Q, min(k, N)]: float32 inner products in descending order and the
    int64 rows of ``doc_emb`` they belong to.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    queries = _as_matrix(query_emb, "query_emb")
    docs = _as_matrix(doc_emb, "doc_emb")
    if queries.shape[1] != docs.shape[1]:
        raise ValueError(f"query_emb has {queries.shape[1]} dimensions but doc_emb has {docs.shape[1]}")
    k = min(k, len(docs))
    if k == 0 or len(queries) == 0:
        return np.zeros((len(queries), k), np.float32), np.zeros((len(queries), k), np.int64)
    scores, indices = flat_ip_index(docs).search(queries, k)
    return scores, indices.astype(np.int64, copy=False)


def _cutoff(metric: str) -> int | None:
    _, _, cutoff = metric.partition("@")
    return int(cutoff) if cutoff.isdigit() else None


def retrieval_metrics(
    qrels: Mapping[str, Mapping[str, int]],
    run: Mapping[str, Mapping[str, float]],
    metrics: Iterable[str] = DEFAULT_METRICS,
) -> dict[str, float]:
    """Mean IR metrics of ``run`` over the queries of ``qrels``, computed by ranx.

    Only judgements with relevance > 0 count as relevant; a query with none is left out
    (no metric is defined for it). A query of the qrels that is absent from the run, or
    has no results, scores 0 on every metric; run queries absent from the qrels are
    ignored. Ties in the run keep the order of the run's dict. Returns ``{metric name:
    mean}`` with the names as given.
    """
    names = list(metrics)
    if not names:
        raise ValueError("give at least one metric")
    # filtered here rather than left to ranx: relevance 0 must mean "not relevant" for every metric
    relevant = {str(q): {str(d): int(s) for d, s in docs.items() if s > 0} for q, docs in qrels.items()}
    relevant = {q: docs for q, docs in relevant.items() if docs}
    if not relevant:
        raise ValueError("the qrels judge no document relevant (score > 0); nothing can be measured")
    scored = {str(q): {str(d): float(s) for d, s in docs.items()} for q, docs in run.items() if docs}
    scored = {q: docs for q, docs in scored.items() if q in relevant}
    if not scored:
        return {name: 0.0 for name in names}  # ranx cannot build an empty run; every query scores 0

    # imported here: ranx loads numba (seconds), which only evaluation needs
    from ranx import Qrels, Run, evaluate

    # make_comparable: ranx otherwise refuses qrels queries missing from the run; it adds them
    # with no results, so they score 0 and still count in the mean
    result = evaluate(Qrels(relevant), Run(scored), names, make_comparable=True)
    if not isinstance(result, dict):  # ranx returns a bare number for a single metric
        result = {names[0]: result}
    return {name: float(result[name]) for name in names}


def encode_texts(encode: Encoder, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """``encode`` over ``texts`` in batches of ``batch_size``: float32 [len(texts), D]."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    texts = list(texts)
    if not texts:
        raise ValueError("nothing to encode: the list of texts is empty")
    parts = []
    for start in range(0, len(texts), batch_size):
        batch = texts[start : start + batch_size]
        emb = _as_matrix(encode(batch), "an encoder's output")
        if len(emb) != len(batch):
            raise ValueError(f"the encoder returned {len(emb)} rows for {len(batch)} texts")
        parts.append(emb)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def _check_cutoffs(metrics: Sequence[str], k: int) -> None:
    for name in metrics:
        cutoff = _cutoff(name)
        if cutoff is not None and cutoff > k:
            # the run would hold only k results per query, silently lowering the metric
            raise ValueError(f"{name} needs {cutoff} results per query but k={k}; raise k to at least {cutoff}")


@overload
def evaluate_dense_retrieval(
    encode_queries: Encoder,
    encode_docs: Encoder,
    data: BeirData,
    k: int = ...,
    batch_size: int = ...,
    metrics: Sequence[str] = ...,
    return_run: Literal[False] = ...,
) -> dict[str, float]: ...


@overload
def evaluate_dense_retrieval(
    encode_queries: Encoder,
    encode_docs: Encoder,
    data: BeirData,
    k: int = ...,
    batch_size: int = ...,
    metrics: Sequence[str] = ...,
    *,
    return_run: Literal[True],
) -> tuple[dict[str, float], Run]: ...


def evaluate_dense_retrieval(
    encode_queries: Encoder,
    encode_docs: Encoder,
    data: BeirData,
    k: int = 100,
    batch_size: int = 128,
    metrics: Sequence[str] = DEFAULT_METRICS,
    return_run: bool = False,
) -> dict[str, float] | tuple[dict[str, float], Run]:
    """Encode the corpus and the queries, retrieve the top ``k`` docs of the whole corpus per
    query exactly (inner product), and score the run against ``data.qrels``.

    Both encoders are called on batches of at most ``batch_size`` texts. Returns
    ``{metric: mean}``; with ``return_run=True`` also the run ``{query id: {doc id:
    score}}`` of the top ``k``. A metric's cutoff may not exceed ``k``.
    """
    metrics = list(metrics)
    _check_cutoffs(metrics, k)
    doc_ids = list(data.corpus)
    query_ids = list(data.queries)
    doc_emb = encode_texts(encode_docs, [data.corpus[d] for d in doc_ids], batch_size)
    query_emb = encode_texts(encode_queries, [data.queries[q] for q in query_ids], batch_size)
    scores, indices = search(query_emb, doc_emb, k)
    run: Run = {
        query_id: {doc_ids[j]: float(s) for s, j in zip(row_scores, row_indices) if j >= 0}
        for query_id, row_scores, row_indices in zip(query_ids, scores, indices)
    }
    result = retrieval_metrics(data.qrels, run, metrics)
    return (result, run) if return_run else result


def evaluate_candidate_ranking(
    data: BeirData | Sequence[WikiQAQuestion],
    *,
    score_fn: PairScorer | None = None,
    encode_queries: Encoder | None = None,
    encode_docs: Encoder | None = None,
    batch_size: int = 128,
    metrics: Sequence[str] = RANKING_METRICS,
) -> dict[str, float]:
    """Rank each query's own candidates (``data.pools``) and report MAP and MRR over them.

    ``data``: :class:`BeirData` with ``pools`` (see :func:`kdforge.data.beir.wikiqa_to_beir`),
    or WikiQA questions, converted by it (questions without a correct sentence dropped).
    Score with either ``score_fn(query, candidates) -> one score per candidate`` (a
    cross-encoder) or encoders, whose inner product is the score; ``encode_docs``
    defaults to ``encode_queries`` (one shared encoder). Returns ``{"map": ..., "mrr":
    ...}`` (or the ``metrics`` asked for); ties keep the candidates' order.
    """
    if not isinstance(data, BeirData):
        data = wikiqa_to_beir(data)
    if data.pools is None:
        raise ValueError("data has no candidate pools; use evaluate_dense_retrieval to search the whole corpus")
    if (score_fn is None) == (encode_queries is None):
        raise ValueError("give either score_fn or encode_queries (and optionally encode_docs), not both or neither")
    query_ids = [q for q in data.pools if q in data.queries]
    run: Run = {}
    if score_fn is not None:
        for query_id in query_ids:
            pool = data.pools[query_id]
            scores = np.asarray(score_fn(data.queries[query_id], [data.corpus[d] for d in pool]), dtype=np.float64)
            if scores.shape != (len(pool),):
                raise ValueError(f"score_fn returned shape {scores.shape} for {len(pool)} candidates")
            run[query_id] = dict(zip(pool, scores.tolist()))
    else:
        assert encode_queries is not None
        # each candidate encoded once, even if pools share it
        doc_ids = list(dict.fromkeys(d for q in query_ids for d in data.pools[q]))
        row = {d: i for i, d in enumerate(doc_ids)}
        doc_emb = encode_texts(encode_docs or encode_queries, [data.corpus[d] for d in doc_ids], batch_size)
        query_emb = encode_texts(encode_queries, [data.queries[q] for q in query_ids], batch_size)
        if query_emb.shape[1] != doc_emb.shape[1]:
            raise ValueError(f"query embeddings have {query_emb.shape[1]} dimensions, docs {doc_emb.shape[1]}")
        for query_id, q_emb in zip(query_ids, query_emb):
            pool = data.pools[query_id]
            scores = doc_emb[[row[d] for d in pool]] @ q_emb
            run[query_id] = dict(zip(pool, scores.astype(np.float64).tolist()))
    qrels = {q: data.qrels.get(q, {}) for q in query_ids}
    return retrieval_metrics(qrels, run, metrics)


def encode_throughput(encode: Encoder, texts: Sequence[str], repeats: int = 3, batch_size: int | None = None) -> float:
    """Texts encoded per second: the median of ``repeats`` timings of encoding all ``texts``
    (in batches of ``batch_size``, default all at once), after one untimed warm-up pass."""
    texts = list(texts)
    if not texts:
        raise ValueError("nothing to encode: the list of texts is empty")
    size = batch_size or len(texts)
    return throughput(
        lambda _: [encode(texts[i : i + size]) for i in range(0, len(texts), size)],
        {},
        batches=1,
        repeats=repeats,
        items=len(texts),
    )


def query_latency(
    encode: Encoder,
    queries: Sequence[str],
    repeats: int = 3,
    doc_emb: np.ndarray | None = None,
    k: int = 10,
) -> float:
    """Milliseconds to serve one query alone (a batch of 1): the mean over ``queries`` of one
    timing, median over ``repeats`` timings, after one untimed warm-up pass.

    With ``doc_emb`` [N, D], each query's time also includes its exact top-``k`` search in
    an index built once beforehand (as a server would hold it).
    """
    index = flat_ip_index(doc_emb) if doc_emb is not None else None
    k = min(k, index.ntotal) if index is not None else k

    def serve(query: str) -> None:
        emb = encode([query])
        if index is not None:
            index.search(_as_matrix(emb, "an encoder's output"), k)

    return serving_latency(serve, queries, repeats)


def serving_latency(serve: Callable[[str], object], queries: Sequence[str], repeats: int = 3) -> float:
    """Milliseconds ``serve`` takes per query, one query at a time: the mean over ``queries`` of
    one timing, median over ``repeats`` timings, after one untimed warm-up pass."""
    queries = list(queries)
    if not queries:
        raise ValueError("no queries to time")

    def one_at_a_time(_) -> None:
        for query in queries:
            serve(query)

    # the median rate of the repeats is the median latency's reciprocal
    rate = throughput(one_at_a_time, {}, batches=1, repeats=repeats, items=len(queries))
    return 1000.0 / rate
