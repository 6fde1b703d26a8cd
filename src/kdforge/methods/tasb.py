"""TAS-B batches: topic-aware batches of margin-balanced training pairs, for dense (and sparse) retrievers.

Hofstätter et al. ("Efficiently Teaching an Effective Dense Retriever with Balanced
Topic Aware Sampling", SIGIR 2021) compose each batch instead of drawing it at random:

- **topic-aware**: the training queries are clustered with k-means (faiss) on the
  miner's query embeddings, and each batch takes all its queries from one cluster, so
  the in-batch negatives of a query are documents of related queries (hard ones; with
  ``data.in_batch`` every query is scored against every document of its batch);
- **balanced margins**: each query's (positive, negative) examples are split into
  equal-width bins of the teacher's margin, and a query's example is drawn from a
  uniformly chosen non-empty bin, so every level of difficulty is seen equally often.

The sampler itself is :class:`kdforge.data.tasb.TASBSampler`; the tasks with
(query, document) pairs (``ranking``, ``sparse_retriever``) offer the pairs, their
teacher margins and the query clusters. Without this method their batches are random
queries with a random example each, over an epoch of the same length. A recipe::

    methods: [{name: tasb_batches, clusters: 25, bins: 10}]
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import Field
from torch.utils.data import Sampler

from kdforge.data.tasb import TASBSampler
from kdforge.methods.base import Method, register_method
from kdforge.provenance import Paper
from kdforge.recipe import Strict


class TASBSettings(Strict):
    clusters: int | None = Field(
        None, ge=1, description="k-means clusters of the training queries (default: queries / (2 * batch size))"
    )
    bins: int = Field(10, ge=1, description="margin bins per query (TAS-B)")


@register_method
class TASBBatches(Method):
    """Each batch's queries from one topic cluster, each query's example from balanced margin bins."""

    name = "tasb_batches"
    summary = (
        "TAS-B: each batch's queries come from one k-means topic cluster, each query's example from"
        " margin-balanced bins of the teacher's margins"
    )
    paper = Paper(
        "Efficiently Teaching an Effective Dense Retriever with Balanced Topic Aware Sampling", 2021, "2104.06967"
    )
    settings = TASBSettings
    requires = frozenset({"has_pairs"})

    def _clusters(self) -> np.ndarray:
        cfg: TASBSettings = self.cfg  # type: ignore[assignment]
        return self.task.query_clusters(cfg.clusters)

    def train_sampler(self, seed: int) -> Sampler[int]:
        cfg: TASBSettings = self.cfg  # type: ignore[assignment]
        t = self.task.triples
        batch_size = self.task.recipe.training.batch_size
        return TASBSampler(t.query, t.margin, self._clusters(), batch_size, seed, bins=cfg.bins)

    def training_info(self, steps: int) -> dict[str, Any]:
        return {"sampler": "tasb", "query_clusters": int(len(np.unique(self._clusters())))}
