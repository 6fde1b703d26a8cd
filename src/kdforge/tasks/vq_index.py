"""Task ``vq_index``: Distill-VQ, an IVF-PQ index learned from a dense teacher's ranking.

Xiao et al. 2022 ("Distill-VQ: Learning Retrieval Oriented Vector Quantization by
Distilling Knowledge from Dense Embeddings"). The teacher is a bi-encoder; its
embeddings of the collection and of the training queries are the fixed inputs
(computed once and kept in kdforge's embedding cache, ``KDFORGE_CACHE_DIR/embeddings``,
so later runs read them back). The student is the index itself
(:class:`kdforge.models.ivfpq.IVFPQStudent`): IVF centroids and PQ codebooks, started
from faiss's IVF-PQ trained for reconstruction and then trained so that scores through
the quantised documents rank like the teacher's. No labels are used.

A batch is B training queries and the union of their teacher top-K documents; every
query is scored against every document of the batch (its own candidates and the other
queries': Distill-VQ's "in-batch + top-K" setting). Outputs, both ``[B, U]``:

- ``scores``: ``<q, o_c(d) + u_hat_d>`` for the student (hard PQ in the forward pass,
  straight-through soft assignment for the gradient), ``<q, d>`` for the teacher;
- ``ivf_scores``: ``<q, o_c(d)>`` for the student (the coarse score Distill-VQ trains with
  its own term); for the teacher the same ``<q, d>`` (its ranking is the target of both).

Train with ``listnet`` on both fields. The no-distillation baseline is the student as
initialised: faiss's own IVF-PQ, same code size and nprobe. The saved student is a
faiss index (``faiss.read_index(folder/index.faiss)``) plus its state for resuming.
Evaluation searches the test queries' teacher embeddings: nDCG@10, Recall@k, MRR@10,
the index's bytes (and per document), its build time and the search latency of one
query (the teacher encodes queries for every row alike; that time is not counted).

Parts: the IVF-PQ index family (:mod:`kdforge.tasks.ivfpq_family`, which holds the
teacher in a sentence-encoder family), query candidates
(:class:`~kdforge.tasks.encoder_data.QueryCandidates`), the retrieval evaluator.
"""

from __future__ import annotations

from kdforge.errors import RecipeError
from kdforge.provenance import Paper
from kdforge.signals import CacheTeacherConfig, OnlineTeacherConfig
from kdforge.tasks.base import TASKS
from kdforge.tasks.encoder_config import VQData, VQStudent
from kdforge.tasks.encoder_data import QueryCandidates, QueryRows
from kdforge.tasks.ivfpq_family import INDEX_FILE, IVFPQFamily
from kdforge.tasks.parts import ComposedTask
from kdforge.tasks.retrieval import RetrievalEvaluator, load_test_set

__all__ = ["INDEX_FILE", "QueryRows", "VQIndexTask"]


@TASKS.register("vq_index")
class VQIndexTask(ComposedTask):
    name = "vq_index"
    paper = Paper(
        "Distill-VQ: Learning Retrieval Oriented Vector Quantization By Distilling Knowledge from Dense Embeddings",
        2022,
        "2204.00185",
        authors="Xiao and others",
    )
    student_schema = VQStudent
    data_schema = VQData
    output_fields = ("scores", "ivf_scores")
    parts = (IVFPQFamily, QueryCandidates, RetrievalEvaluator)

    family: IVFPQFamily
    data: QueryCandidates

    def __init__(self, recipe):
        super().__init__(recipe)
        if not isinstance(recipe.teacher, (OnlineTeacherConfig, CacheTeacherConfig)) or not recipe.teacher.model:
            raise RecipeError(
                "teacher.model: Distill-VQ learns an index over a bi-encoder's embeddings; name that bi-encoder"
            )
        if isinstance(recipe.teacher, CacheTeacherConfig):
            raise RecipeError(
                "teacher.signal: the teacher's embeddings are computed once and kept in kdforge's embedding"
                " cache by themselves; use an online teacher (signal: online)"
            )

    def build_parts(self):
        test = self.data_cfg.test
        family = IVFPQFamily(self.recipe, self.student_cfg, self.data_cfg, collection=lambda: load_test_set(test))
        evaluator = RetrievalEvaluator(test, search=family.search)
        return family, QueryCandidates(self.recipe, self.data_cfg, family), evaluator

    def baseline_objective(self) -> None:
        """No labels: the baseline is the index as initialised, faiss's IVF-PQ trained for reconstruction."""
        return None
