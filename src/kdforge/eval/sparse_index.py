"""An inverted index over learned sparse document weights, searched with model-free queries.

The index is a compressed sparse column matrix ``[documents, vocabulary]``: column t
holds term t's posting list (the documents that have the term, with their weights),
which is what a search engine's inverted index stores. A query touches only the
columns of its own tokens: score(d) = sum over the query's tokens t of q_t * w_{d,t},
then the top k. SciPy does the column gather and the sums; no model runs at query
time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp


@dataclass
class SparseIndex:
    postings: sp.csc_matrix  # [N, V] document weights, one column per term
    build_seconds: float

    @classmethod
    def build(cls, weights: sp.spmatrix) -> SparseIndex:
        started = time.perf_counter()
        postings = sp.csc_matrix(weights, dtype=np.float32)
        postings.eliminate_zeros()
        postings.sort_indices()
        return cls(postings, time.perf_counter() - started)

    @property
    def documents(self) -> int:
        return self.postings.shape[0]

    def nbytes(self) -> int:
        """Bytes of the posting lists: a document number and a weight per entry, plus one offset per term."""
        p = self.postings
        return int(p.data.nbytes + p.indices.nbytes + p.indptr.nbytes)

    def nonzeros_per_document(self) -> float:
        return self.postings.nnz / max(self.documents, 1)

    def scores(self, terms: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """``[N]`` scores of one query given as its term ids and their weights."""
        if len(terms) == 0:
            return np.zeros(self.documents, dtype=np.float32)
        return np.asarray(self.postings[:, terms] @ weights.astype(np.float32)).ravel()

    def search(self, terms: np.ndarray, weights: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (document rows, scores) of one query, best first; documents scoring 0 are left out."""
        scores = self.scores(terms, weights)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")]
        keep = scores[top] > 0
        return top[keep], scores[top][keep]


def query_terms(vectors: sp.csr_matrix, row: int) -> tuple[np.ndarray, np.ndarray]:
    """The (term ids, weights) of row ``row`` of a sparse query matrix."""
    start, end = vectors.indptr[row], vectors.indptr[row + 1]
    return vectors.indices[start:end], vectors.data[start:end]
