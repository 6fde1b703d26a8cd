"""Task ``embedding``: compress a sentence encoder on unlabeled text.

The student learns to give the teacher's embeddings to the same texts (a BEIR
folder's documents and training queries, or your own file). Outputs a recipe's terms
compare:

- ``embeddings``: the sentence embedding ``[B, D]`` (``embedding_mse``, ``cosine_distance``);
- ``scores``: the in-batch cosine-similarity matrix ``[B, B]``, its diagonal (a text
  with itself) excluded as ``-inf``, for ``listwise_kl`` over each text's neighbours
  (on several processes, each process's rows against the whole global batch);
- per-layer ``hidden_states``, ``attentions``, ``qkv`` and ``values``, for MiniLM's
  ``attention_kl``, ``value_relation`` and ``qkv_relations``: pick the layer with the
  term's ``layer`` (``-1``: the last, as MiniLM does). These terms count real tokens
  (``token_mask``) without the recipe naming a mask.

There are no labels, so the no-distillation baseline is the student as initialised
(the teacher's layer subset, or the pretrained compact model), untrained.

Parts: the sentence-encoder family (texts layout), unlabeled texts, the retrieval evaluator.
"""

from __future__ import annotations

from kdforge.recipe import ObjectiveTerm
from kdforge.tasks.base import TASKS
from kdforge.tasks.encoder_config import EmbeddingData, EncoderStudent
from kdforge.tasks.encoder_data import TextDataset, UnlabeledTexts, read_text_file
from kdforge.tasks.encoders import TOKEN_FIELDS, SentenceEncoderFamily, recipe_teacher_ref
from kdforge.tasks.parts import ComposedTask
from kdforge.tasks.retrieval import RetrievalEvaluator

__all__ = ["EmbeddingTask", "TextDataset", "read_text_file"]


@TASKS.register("embedding")
class EmbeddingTask(ComposedTask):
    name = "embedding"
    student_schema = EncoderStudent
    data_schema = EmbeddingData
    output_fields = ("embeddings", "scores", *TOKEN_FIELDS)
    parts = (SentenceEncoderFamily, UnlabeledTexts, RetrievalEvaluator)

    def build_parts(self):
        family = SentenceEncoderFamily(
            self.recipe, self.student_cfg, self.data_cfg, layout="texts", teacher_ref=recipe_teacher_ref(self.recipe)
        )
        cfg = self.data_cfg
        evaluator = RetrievalEvaluator(
            cfg.test, search=family.search, encoders=family, max_length=cfg.max_length, query_max_length=cfg.max_length
        )
        data = UnlabeledTexts(cfg, family, evaluator.test_set)
        family.calibration_texts = data.train_texts  # the layers of a student cut from the teacher are scored on them
        return family, data, evaluator

    def baseline_objective(self) -> list[ObjectiveTerm] | None:
        return None
