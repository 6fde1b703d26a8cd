"""Task ``ranking``: a bi-encoder student learns a teacher's relevance scores.

Training examples are (query, positive, K negatives) from a BEIR folder's training
qrels. Negatives are mined with a bi-encoder (the teacher, or ``data.miner``): each
query's top documents that are not judged relevant. The teacher scores every
(query, candidate) pair; the student's scores are the similarities of its query and
document embeddings. Outputs:

- ``scores``: ``[B, 1+K]``, the positive in column 0, for ``margin_mse`` (Hofstätter
  et al. 2020) and ``listwise_kl``;
- ``embeddings``: the queries' then the documents' embeddings ``[B + B(1+K), D]``.

The teacher is any scorer: a sentence-transformers bi-encoder, a ``CrossEncoder``
(loaded as one when its folder holds a sequence-classification model), or a kdforge
cache of its scores. Each batch draws random queries and a random example of each
(:class:`~kdforge.data.tasb.RandomPairSampler`), unless the recipe lists the
``tasb_batches`` method (:mod:`kdforge.methods.tasb`): its batches follow TAS-B
(Hofstätter et al. 2021), each from one k-means cluster of the training queries (on the
miner's query embeddings), each query's example from margin-balanced bins of the
teacher's margins. The task offers the method its training pairs (capability
``has_pairs``): :attr:`RankingTask.triples` (each example's query and teacher margin)
and :meth:`RankingTask.query_clusters`, which are the ranking-pairs data source's.

The no-distillation baseline trains on the labels alone: InfoNCE over the same
candidates (``contrastive``).

Parts: the sentence-encoder family (pairs layout: bi-encoders, cross-encoder teachers),
ranking pairs (:class:`~kdforge.tasks.encoder_data.RankingPairs`), the retrieval evaluator.
"""

from __future__ import annotations

import numpy as np

from kdforge.errors import RecipeError
from kdforge.recipe import ObjectiveTerm
from kdforge.signals import CacheTeacherConfig
from kdforge.tasks.base import TASKS
from kdforge.tasks.encoder_config import EncoderStudent, RankingData
from kdforge.tasks.encoder_data import RankingPairs, TrainingTriples, TripleDataset
from kdforge.tasks.encoders import SentenceEncoderFamily, in_batch_layout, recipe_teacher_ref
from kdforge.tasks.parts import ComposedTask
from kdforge.tasks.retrieval import RetrievalEvaluator

__all__ = ["RankingTask", "TrainingTriples", "TripleDataset", "in_batch_layout", "refuse_cached_in_batch"]


def refuse_cached_in_batch(recipe, in_batch: bool) -> None:
    """A cache holds each example's own candidates only: in-batch scoring needs a teacher that scores new pairs."""
    if in_batch and isinstance(recipe.teacher, CacheTeacherConfig):
        raise RecipeError(
            "data.in_batch: a cache holds each example's own candidates, not the documents a batch happens to"
            " hold; use an online (or served) teacher, or set data.in_batch: false"
        )


@TASKS.register("ranking")
class RankingTask(ComposedTask):
    name = "ranking"
    capabilities = frozenset({"has_pairs"})
    student_schema = EncoderStudent
    data_schema = RankingData
    output_fields = ("scores", "embeddings")
    parts = (SentenceEncoderFamily, RankingPairs, RetrievalEvaluator)

    data: RankingPairs

    def __init__(self, recipe):
        super().__init__(recipe)
        refuse_cached_in_batch(recipe, self.data_cfg.in_batch)

    def build_parts(self):
        cfg = self.data_cfg
        family = SentenceEncoderFamily(
            self.recipe,
            self.student_cfg,
            cfg,
            layout="pairs",
            teacher_ref=recipe_teacher_ref(self.recipe),
            miner=cfg.miner,
        )
        evaluator = RetrievalEvaluator(
            cfg.test,
            search=family.search,
            encoders=family,
            max_length=cfg.max_length,
            query_max_length=cfg.query_max_length,
        )
        return family, RankingPairs(self.recipe, cfg, family, evaluator.test_set), evaluator

    # ---- capability has_pairs: the data source's training pairs ----------------------------
    @property
    def triples(self) -> TrainingTriples:
        return self.data.triples

    def query_clusters(self, clusters: int | None = None) -> np.ndarray:
        return self.data.query_clusters(clusters)

    def baseline_objective(self) -> list[ObjectiveTerm]:
        return [ObjectiveTerm(loss="contrastive", field="scores", weight=1.0)]
