"""Classification of feature vectors with MLPs (scikit-learn's digits, or your .npz).

Outputs: ``logits`` [B, C], ``hidden`` (the last hidden layer's features, [B, H]) and
``hidden_states`` (one [B, H] per hidden layer).
Metrics: accuracy and macro-F1 (scikit-learn). A recipe with no teacher trains on
labels only, which is how a teacher for a later distillation run is made.

Parts: the MLP family (:class:`~kdforge.tasks.mlp_family.MLPFamily`), the feature table
(:class:`~kdforge.tasks.feature_data.FeatureTable`), the classification evaluator
(:class:`~kdforge.tasks.classifier_eval.ClassificationEvaluator`, shared with
``text_classification``).
"""

from __future__ import annotations

from kdforge.tasks.base import TASKS
from kdforge.tasks.classifier_eval import ClassificationEvaluator
from kdforge.tasks.feature_data import FeatureData, FeatureTable
from kdforge.tasks.mlp_family import MLPFamily, MLPStudent
from kdforge.tasks.parts import ComposedTask

__all__ = ["ClassificationTask", "FeatureData", "MLPStudent"]


@TASKS.register("classification")
class ClassificationTask(ComposedTask):
    name = "classification"
    capabilities = frozenset({"has_labels", "gives_logits"})
    student_schema = MLPStudent
    data_schema = FeatureData
    output_fields = ("logits", "hidden", "hidden_states")
    parts = (MLPFamily, FeatureTable, ClassificationEvaluator)

    family: MLPFamily
    data: FeatureTable

    def build_parts(self):
        data = FeatureTable(self.data_cfg)
        family = MLPFamily(self.recipe, self.student_cfg, data)
        return family, data, ClassificationEvaluator(logits=family.logits, labels=data.labels)

    @property
    def num_classes(self) -> int:
        return self.data.num_classes

    @property
    def in_features(self) -> int:
        return self.data.in_features
