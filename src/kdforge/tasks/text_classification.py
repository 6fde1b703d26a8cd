"""Text classification of any labelled text (bundled: SST-2, TREC, emotion), with encoder classifiers.

Single texts or pairs (``text``, ``text_pair``), one label or several (``data.multi_label``:
sigmoid outputs, ``binary_cross_entropy`` and ``binary_kd``, micro/macro-F1).

The teacher is a :class:`~kdforge.models.text_classifier.TextClassifier` (a sentence
encoder with a linear head) fine-tuned by a recipe with no teacher, labels only.
Students are a subset of the teacher's layers (``student.num_layers``/``layers``,
head included), or a pretrained compact encoder with a new head (``student.model``,
e.g. the ONNX paraphrase-MiniLM-L3-v2, which takes the teacher's tokenizer).

Outputs: ``logits`` [B, C], ``hidden`` (the pooled embedding the head reads, [B, H]),
and per layer ``hidden_states``, ``attentions``, ``qkv``, ``values`` (MiniLM's
relations, MI-alpha on intermediate layers). Metrics: accuracy and macro-F1
(scikit-learn); the runner adds fidelity to the teacher and examples/s.

The task offers PGKD its labelled texts (capability ``labelled_texts``):
:meth:`~TextClassificationTask.labelled_texts`, :meth:`~TextClassificationTask.dataset_of`,
:attr:`~TextClassificationTask.class_names` and :meth:`~TextClassificationTask.task_description`
are the data source's, :meth:`~TextClassificationTask.probabilities` the family's logits.

Parts: the text-classifier family (:class:`~kdforge.tasks.text_classifier_family.TextClassifierFamily`),
labelled texts (:class:`~kdforge.tasks.text_data.LabelledTextSource`), the classification evaluator
(:class:`~kdforge.tasks.classifier_eval.ClassificationEvaluator`, shared with ``classification``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from kdforge.data.text_classification import LabelledText
from kdforge.errors import RecipeError
from kdforge.recipe import ObjectiveTerm, Recipe
from kdforge.tasks.base import TASKS
from kdforge.tasks.classifier_eval import ClassificationEvaluator
from kdforge.tasks.parts import ComposedTask
from kdforge.tasks.text_classifier_family import TextClassifierFamily, TextClassifierStudent
from kdforge.tasks.text_data import DESCRIPTIONS, LabelledSet, LabelledTextSource, TextClassData

__all__ = ["DESCRIPTIONS", "LabelledSet", "TextClassData", "TextClassificationTask", "TextClassifierStudent"]


@TASKS.register("text_classification")
class TextClassificationTask(ComposedTask):
    name = "text_classification"
    capabilities = frozenset({"has_labels", "gives_logits", "labelled_texts"})
    student_schema = TextClassifierStudent
    data_schema = TextClassData
    output_fields = ("logits", "hidden", "hidden_states", "attentions", "qkv", "values")
    parts = (TextClassifierFamily, LabelledTextSource, ClassificationEvaluator)

    family: TextClassifierFamily
    data: LabelledTextSource

    def build_parts(self):
        # the family checks models against the data's classes; the data tokenizes with the family's tokenizer
        family = TextClassifierFamily(self.recipe, self.student_cfg, self.data_cfg, lambda: data.class_names)
        data = LabelledTextSource(self.data_cfg, family.tokens)
        return family, data, ClassificationEvaluator(logits=family.logits, labels=data.labels)

    #: the losses of logits that treat the classes as one softmax (single-label) or as yes/no each (multi-label)
    MULTI_LABEL_LOSSES = ("binary_cross_entropy", "binary_kd")

    #: methods that read one class per example (its index, its margin, a written "label: text" line)
    SINGLE_LABEL_METHODS = ("pgkd", "active_distillation", "data_pruning", "ground_truth_mixing")

    @classmethod
    def check_sections(cls, recipe: Recipe, data_cfg: TextClassData) -> None:
        if data_cfg.multi_label:
            for i, name in enumerate(recipe.method_names()):
                if name in cls.SINGLE_LABEL_METHODS:
                    raise RecipeError(
                        f"methods[{i}]: {name} works with one label per text, but data.multi_label is true;"
                        " remove the method or train single-label"
                    )
        for i, term in enumerate(recipe.objective):
            if term.field != "logits":
                continue
            if data_cfg.multi_label and term.loss not in cls.MULTI_LABEL_LOSSES:
                raise RecipeError(
                    f"objective[{i}].loss: {term.loss!r} makes the classes compete in one softmax, but"
                    " data.multi_label is true; use binary_cross_entropy (labels) and binary_kd (teacher)"
                )
            if not data_cfg.multi_label and term.loss in cls.MULTI_LABEL_LOSSES:
                raise RecipeError(
                    f"objective[{i}].loss: {term.loss!r} is for multi-label data; set data.multi_label: true,"
                    " or use cross_entropy and hinton_kd"
                )

    def baseline_objective(self) -> list[ObjectiveTerm] | None:
        loss = "binary_cross_entropy" if self.data_cfg.multi_label else "cross_entropy"
        return [ObjectiveTerm(loss=loss, field="logits", weight=1.0)]

    # ---- capability labelled_texts (PGKD adds to the training texts) ------------------------
    @property
    def class_names(self) -> list[str]:
        return self.data.class_names

    def labelled_texts(self, dataset: Dataset) -> list[LabelledText]:
        return self.data.labelled_texts(dataset)

    def dataset_of(self, examples: list[LabelledText]) -> Dataset:
        return self.data.dataset_of(examples)

    def probabilities(self, model: nn.Module, texts: list[str]) -> np.ndarray:
        logits = self.family.logits(model, LabelledSet(texts, [0] * len(texts)))
        return (torch.sigmoid(logits) if self.data_cfg.multi_label else torch.softmax(logits, dim=-1)).numpy()

    def task_description(self) -> str:
        """What the classes mean, in one sentence (a generative teacher's prompt)."""
        return self.data.task_description()
