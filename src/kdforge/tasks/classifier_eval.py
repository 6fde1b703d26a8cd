"""The classification evaluator, shared by ``classification`` and ``text_classification``.

:class:`ClassificationEvaluator` (a :class:`~kdforge.tasks.parts.Evaluator`) judges a
classifier on held-out labelled examples: accuracy and macro-F1 (scikit-learn) of the
model's argmax, and the logits themselves, which the runner compares with the teacher's
(fidelity). How a model's logits are computed is its family's (``logits(model, dataset)``,
[N, C] in the dataset's order), and what each example's class is the data source's
(``labels(dataset)``); the metrics are computed once, here, for both.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from kdforge.tasks.base import Evaluation

#: a family's logits of a model on a dataset, [N, C] in the dataset's order
Logits = Callable[[nn.Module, Dataset], torch.Tensor]
#: a data source's class index of each example of a dataset, [N]
Labels = Callable[[Dataset], np.ndarray]


class ClassificationEvaluator:
    """Accuracy and macro-F1 of ``logits``' argmax against ``labels``; the logits go to fidelity.

    Multi-hot labels ([N, C], ``data.multi_label``) are scored per class (logit > 0): accuracy is
    the share of examples with every label right, with micro- and macro-F1 over the labels."""

    primary_metric = "accuracy"
    higher_is_better = True

    def __init__(self, *, logits: Logits, labels: Labels):
        self.logits = logits
        self.labels = labels

    def evaluate(self, model: nn.Module, dataset: Dataset) -> Evaluation:
        from sklearn.metrics import accuracy_score, f1_score  # imported here: scikit-learn takes 1.5 s

        logits = self.logits(model, dataset)
        y_true = self.labels(dataset)
        if y_true.ndim == 2:  # multi-hot labels: each class is predicted on its own (sigmoid > 0.5)
            y_pred = (logits > 0).numpy().astype(y_true.dtype)
            metrics = {
                "accuracy": float(accuracy_score(y_true, y_pred)),  # every label of the example right
                "micro_f1": float(f1_score(y_true, y_pred, average="micro", zero_division=0)),
                "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
            }
            return Evaluation(metrics=metrics, logits=logits)
        y_pred = logits.argmax(-1).numpy()
        metrics = {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        }
        return Evaluation(metrics=metrics, logits=logits)

    def sample_generations(self, models: dict[str, nn.Module], dataset: Dataset) -> list[dict[str, str]] | None:
        return None
