"""Task ``sparse_retriever``: an inference-free learned sparse retriever distilled from dense and BM25 teachers.

Geng et al. 2024 (arXiv 2411.04403): the student encodes documents only
(:mod:`kdforge.models.sparse_encoder`); a query is its tokens weighted by their IDF
on the corpus, so serving a query runs no model, and search is a sum over the query
tokens' posting lists of an inverted index (:mod:`kdforge.eval.sparse_index`).

Training data are the ranking task's (query, positive, negatives) with in-batch
negatives; the teachers are any of the ranking task's (a bi-encoder, a
cross-encoder) and BM25 (``teacher.model: bm25``, through bm25s), usually as an
ensemble, whose ``scores`` are min-max normalised per query and averaged
(:mod:`kdforge.signals.ensemble`). Outputs:

- ``scores``: the student's (query, document) scores, laid out as the ranking task's;
- ``doc_weights``: ``[B, 1+K, V]`` document term weights, for ``flops`` (the batch
  mean per candidate slot, as Geng et al.'s code), warmed up quadratically through
  the term's weight schedule.

Evaluation: nDCG@10, Recall@k and MRR@10 on the test collection through the inverted
index, the median latency of one query (tokenize, weigh, search), the documents'
average non-zero terms, the index's bytes per document and its build time.

Parts: the sparse-encoder family (:mod:`kdforge.tasks.sparse_family`, which holds the
dense teachers in a sentence-encoder family), ranking pairs (the ranking task's data
source, built here, not inherited), the retrieval evaluator.
"""

from __future__ import annotations

import numpy as np

from kdforge.provenance import Paper
from kdforge.recipe import ObjectiveTerm
from kdforge.tasks.base import TASKS
from kdforge.tasks.encoder_config import SparseData, SparseStudent
from kdforge.tasks.encoder_data import RankingPairs, TrainingTriples
from kdforge.tasks.parts import ComposedTask
from kdforge.tasks.ranking import refuse_cached_in_batch
from kdforge.tasks.retrieval import RetrievalEvaluator
from kdforge.tasks.sparse_family import DOC_INPUTS, SparseEncoderFamily

__all__ = ["DOC_INPUTS", "SparseRetrieverTask"]


@TASKS.register("sparse_retriever")
class SparseRetrieverTask(ComposedTask):
    name = "sparse_retriever"
    paper = Paper(
        "Towards Competitive Search Relevance For Inference-Free Learned Sparse Retrievers",
        2024,
        "2411.04403",
        authors="Geng and others",
    )
    capabilities = frozenset({"has_pairs"})
    student_schema = SparseStudent
    data_schema = SparseData
    output_fields = ("scores", "doc_weights")
    parts = (SparseEncoderFamily, RankingPairs, RetrievalEvaluator)

    family: SparseEncoderFamily
    data: RankingPairs

    def __init__(self, recipe):
        super().__init__(recipe)
        refuse_cached_in_batch(recipe, self.data_cfg.in_batch)

    def build_parts(self):
        cfg = self.data_cfg
        # the query IDF and BM25 are computed on the data source's training corpus
        family = SparseEncoderFamily(self.recipe, self.student_cfg, cfg, corpus=lambda: self.data.train_collection)
        evaluator = RetrievalEvaluator(
            cfg.test,
            search=family.search,
            encoders=family.dense,
            max_length=cfg.max_length,
            query_max_length=cfg.query_max_length,
        )
        return family, RankingPairs(self.recipe, cfg, family.dense, evaluator.test_set), evaluator

    # ---- capability has_pairs: the data source's training pairs ----------------------------
    @property
    def triples(self) -> TrainingTriples:
        return self.data.triples

    def query_clusters(self, clusters: int | None = None) -> np.ndarray:
        return self.data.query_clusters(clusters)

    def baseline_objective(self) -> list[ObjectiveTerm]:
        """Labels only: InfoNCE over the same candidates at T = 1 (sparse scores are unnormalised sums,
        tens in size, not cosines, so the bi-encoders' T = 0.05 would saturate the softmax)."""
        return [ObjectiveTerm(loss="contrastive", field="scores", weight=1.0, params={"temperature": 1.0})]
