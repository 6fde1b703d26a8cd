"""The retrieval evaluator, shared by every task whose models search a collection.

:class:`RetrievalEvaluator` (a :class:`~kdforge.tasks.parts.Evaluator`) evaluates on a
BEIR-layout test folder (``data.test``): nDCG@10 (the primary metric), Recall@k and
MRR@10 through ranx and the median latency of one query, for every model of a run
alike. A bi-encoder searches by its embeddings, and also ranks WikiQA's candidates
(MAP, MRR) when the recipe names that folder; a model with its own index (a
cross-encoder re-ranking a first stage, a sparse encoder's inverted index, BM25, an
IVF-PQ index) is searched by its model family's ``search``, which returns a
:class:`Searched`, and the evaluator measures that ranking the same way. The runner
adds throughput and size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn
from torch.utils.data import Dataset

from kdforge.data.beir import BeirData, load_beir, load_wikiqa, wikiqa_to_beir
from kdforge.eval.retrieval import (
    evaluate_candidate_ranking,
    evaluate_dense_retrieval,
    query_latency,
    retrieval_metrics,
)
from kdforge.tasks.base import Evaluation
from kdforge.tasks.encoder_config import RetrievalTest

if TYPE_CHECKING:
    from kdforge.tasks.encoders import SentenceEncoderFamily


class RetrievalSet(Dataset):
    """A test collection; its items are the documents (what throughput is timed on)."""

    def __init__(self, data: BeirData, wikiqa: BeirData | None = None):
        self.data = data
        self.wikiqa = wikiqa
        self.doc_ids = list(data.corpus)

    def __len__(self) -> int:
        return len(self.doc_ids)

    def __getitem__(self, index: int) -> str:
        return self.data.corpus[self.doc_ids[index]]


def limit_collection(data: BeirData, query_limit: int | None, corpus_limit: int | None) -> BeirData:
    """The first ``query_limit`` queries, searched among their judged documents plus the first
    ``corpus_limit`` others (a small, still meaningful collection for quick runs and tests)."""
    queries = dict(list(data.queries.items())[:query_limit]) if query_limit else data.queries
    qrels = {q: data.qrels[q] for q in queries}
    if corpus_limit is None:
        return BeirData(data.corpus, queries, qrels, data.pools)
    judged = {d for judgements in qrels.values() for d in judgements}
    others = [d for d in data.corpus if d not in judged][:corpus_limit]
    keep = judged | set(others)
    corpus = {d: text for d, text in data.corpus.items() if d in keep}
    pools = {q: [d for d in data.pools[q] if d in keep] for q in queries} if data.pools else None
    return BeirData(corpus, queries, qrels, pools)


def load_test_set(test: RetrievalTest) -> RetrievalSet:
    """The collection ``data.test`` names (limited as it says), with its WikiQA questions when it names them."""
    data = limit_collection(
        load_beir(test.beir, test.split, field="data.test.beir"), test.query_limit, test.corpus_limit
    )
    wikiqa = None
    if test.wikiqa is not None:
        questions = load_wikiqa(test.wikiqa, test.wikiqa_split, field="data.test.wikiqa")
        wikiqa = wikiqa_to_beir(questions[: test.wikiqa_limit] if test.wikiqa_limit else questions)
    return RetrievalSet(data, wikiqa)


@dataclass
class Searched:
    """A model's search of a test collection, by its family's own index.

    ``run``: each query's retrieved documents and scores; ``query_ms``: called after the metrics, the
    milliseconds one query takes to serve; ``stats``: the index's own figures (bytes per document, ...).
    """

    run: dict[str, dict[str, float]]
    query_ms: Callable[[], float]
    stats: dict[str, float] = field(default_factory=dict)


#: a model family's search: ``(model, collection, data.test) -> Searched``, or None where the model is a
#: bi-encoder the evaluator searches with by its embeddings
Search = Callable[[nn.Module, BeirData, RetrievalTest], "Searched | None"]


class RetrievalEvaluator:
    """BEIR nDCG@10, Recall@k, MRR@10, WikiQA and query latency on ``data.test`` (see the module)."""

    primary_metric = "ndcg@10"
    higher_is_better = True

    def __init__(
        self,
        test: RetrievalTest,
        *,
        search: Search,
        encoders: SentenceEncoderFamily | None = None,
        max_length: int | None = None,
        query_max_length: int | None = None,
    ):
        """``search``: the model family's own search (None for a bi-encoder); ``encoders``, with the document
        and query token lengths, encode a bi-encoder's texts (a task whose models all have their own
        search, as vq_index, gives none)."""
        self.test = test
        self.search = search
        self.encoders = encoders
        self.max_length, self.query_max_length = max_length, query_max_length

    def test_set(self) -> RetrievalSet:
        return load_test_set(self.test)

    def metric_names(self) -> tuple[str, ...]:
        return ("ndcg@10", f"recall@{self.test.k}", "mrr@10")

    def evaluate(self, model: nn.Module, dataset: Dataset) -> Evaluation:
        assert isinstance(dataset, RetrievalSet)
        searched = self.search(model, dataset.data, self.test)
        if searched is not None:
            metrics = retrieval_metrics(dataset.data.qrels, searched.run, self.metric_names())
            metrics["query_ms"] = searched.query_ms()
            metrics.update(searched.stats)
            return Evaluation(metrics=metrics)
        return self._dense(model, dataset)

    # ---- a bi-encoder: search by its embeddings ------------------------------------------------
    def _encoder(self, model: nn.Module, max_length: int, what: str = ""):
        if self.encoders is None:
            raise TypeError(f"this task has no bi-encoder to search with {type(model).__name__}")
        return self.encoders.encoder(model, max_length, what)

    def _retrieval(self, model: nn.Module, data: BeirData, k: int, label: str) -> dict[str, float]:
        # one call per side: encode() batches by length itself and shows the progress
        queries = self._encoder(model, self.query_max_length, f"{label} queries")
        docs = self._encoder(model, self.max_length, f"{label} documents")
        everything = max(len(data.corpus), len(data.queries), 1)
        if data.pools is not None:  # each query ranks its own candidates (WikiQA)
            return evaluate_candidate_ranking(data, encode_queries=queries, encode_docs=docs, batch_size=everything)
        return evaluate_dense_retrieval(queries, docs, data, k=k, batch_size=everything, metrics=self.metric_names())

    def _dense(self, model: nn.Module, dataset: RetrievalSet) -> Evaluation:
        cfg = self.test
        metrics = self._retrieval(model, dataset.data, cfg.k, "test")
        if dataset.wikiqa is not None:
            metrics.update(
                {f"wikiqa_{k}": v for k, v in self._retrieval(model, dataset.wikiqa, cfg.k, "wikiqa").items()}
            )
        queries = list(dataset.data.queries.values())[: cfg.latency_queries]
        metrics["query_ms"] = query_latency(self._encoder(model, self.query_max_length), queries)
        return Evaluation(metrics=metrics)

    def sample_generations(self, models: dict[str, nn.Module], dataset: Dataset) -> list[dict[str, Any]] | None:
        return None
