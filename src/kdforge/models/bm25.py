"""BM25 as a teacher and as a baseline: the lexical scorer of a fixed corpus, through bm25s.

A teacher for ranking distillation only has to score (query, document) pairs of a
batch; BM25 does that from the corpus statistics (document frequencies, lengths)
it was indexed with. :class:`BM25Scorer` indexes the corpus once with bm25s
(Lù 2024) and scores a query against any of the corpus's documents by id, so it
fits kdforge's teacher contract (an ``nn.Module`` the task's adapter runs) and can
sit in an ensemble with a dense teacher, as in Geng et al. 2024's inference-free
sparse retriever. It has no weights: it is never trained and never moved.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from torch import nn

#: the name a recipe gives this teacher (``teacher.model: bm25``, or an ensemble member's)
BM25_REF = "bm25"


@dataclass(frozen=True)
class BM25Settings:
    k1: float = 1.5
    b: float = 0.75
    method: str = "lucene"
    stemmer: str | None = "english"
    stopwords: str | None = "en"


class BM25Scorer(nn.Module):
    """BM25 over ``corpus`` (doc id -> text), built with bm25s."""

    def __init__(self, corpus: dict[str, str], settings: BM25Settings = BM25Settings()):
        import bm25s

        super().__init__()
        self.settings = settings
        self.doc_ids = list(corpus)
        self.row = {d: i for i, d in enumerate(self.doc_ids)}
        self._stemmer = _stemmer(settings.stemmer)
        started = time.perf_counter()
        tokens = self.tokenize([corpus[d] for d in self.doc_ids])
        self.index = bm25s.BM25(k1=settings.k1, b=settings.b, method=settings.method)
        self.index.index(tokens, show_progress=False)
        self.build_seconds = time.perf_counter() - started

    def tokenize(self, texts: list[str], ids: bool = True):
        """bm25s tokens of ``texts`` (stopwords removed, stemmed): ids in the index's vocabulary, or strings."""
        import bm25s

        return bm25s.tokenize(
            texts,
            stopwords=self.settings.stopwords,
            stemmer=self._stemmer,
            return_ids=ids,
            show_progress=False,
        )

    def scores(self, queries: list[str], doc_ids: list[str]) -> np.ndarray:
        """``[len(queries), len(doc_ids)]`` BM25 scores of every query against the named documents."""
        rows = np.array([self._row(d) for d in doc_ids], dtype=np.int64)
        out = np.zeros((len(queries), len(rows)), dtype=np.float32)
        for i, tokens in enumerate(self.tokenize(queries, ids=False)):
            # bm25s scores a query against the whole corpus at once (sparse column sums): cheap
            out[i] = self.index.get_scores(tokens)[rows]
        return out

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (corpus rows, scores) per query."""
        tokens = self.tokenize(queries)
        k = min(k, len(self.doc_ids))
        rows, scores = self.index.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return np.asarray(rows), np.asarray(scores, dtype=np.float32)

    def _row(self, doc_id: str) -> int:
        row = self.row.get(doc_id)
        if row is None:
            raise KeyError(f"BM25 was indexed without document {doc_id!r}")
        return row

    def forward(self, *args, **kwargs):  # pragma: no cover - the task's adapter calls scores()
        raise TypeError("BM25Scorer is called through scores() or search()")


def _stemmer(language: str | None):
    if language is None:
        return None
    import Stemmer

    return Stemmer.Stemmer(language)
