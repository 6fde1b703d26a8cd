"""Classification of feature vectors with MLPs (scikit-learn's digits, or your .npz).

Outputs: ``logits`` [B, C], ``hidden`` (the last hidden layer's features, [B, H]) and
``hidden_states`` (one [B, H] per hidden layer).
Metrics: accuracy and macro-F1 (scikit-learn). A recipe with no teacher trains on
labels only, which is how a teacher for a later distillation run is made.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.utils.data import Dataset, Subset

from kdforge.data.features import MNIST_IMAGES, MNIST_LABELS, FeatureDataset, load_arrays, split_indices
from kdforge.errors import ModelRefError, RecipeError
from kdforge.models.mlp import MLPClassifier
from kdforge.models.refs import resolve_model_ref
from kdforge.models.store import is_kdforge_folder, load_kdforge_model, save_kdforge_model
from kdforge.outputs import ModelOutputs
from kdforge.recipe import Strict
from kdforge.settings import data_dir
from kdforge.tasks.base import MOVED_TO_METHODS, TASKS, Evaluation, Splits, Task, refuse_moved_settings


class MLPStudent(Strict):
    kind: Literal["mlp"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [32], description="hidden layer widths")
    dropout: float = Field(0.0, ge=0, lt=1)
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    init: str | None = Field(None, description="a saved model to start from instead of random weights")


class FeatureData(Strict):
    dataset: Literal["digits", "mnist", "npz"] = Field(
        "digits", description="digits (scikit-learn), mnist (KDFORGE_DATA_DIR/mnist, 10,000 images), or npz"
    )
    path: str | None = Field(None, description="the .npz file (X, y) when dataset is npz")
    test_fraction: float = Field(0.25, gt=0, lt=1)
    validation_fraction: float = Field(0.0, ge=0, lt=1)
    split_seed: int = 0
    train_limit: int | None = Field(None, ge=1, description="use only the first N training examples")

    _moved = model_validator(mode="before")(lambda data: refuse_moved_settings(data, MOVED_TO_METHODS))


@TASKS.register("classification")
class ClassificationTask(Task):
    name = "classification"
    capabilities = frozenset({"has_labels", "gives_logits"})
    student_schema = MLPStudent
    data_schema = FeatureData
    output_fields = ("logits", "hidden", "hidden_states")
    primary_metric = "accuracy"
    load_hint = "from kdforge.models.store import load_kdforge_model\nmodel = load_kdforge_model({folder!r})"

    @cached_property
    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return load_arrays(self.data_cfg.dataset, self.data_cfg.path)

    @property
    def num_classes(self) -> int:
        return int(self._arrays[1].max()) + 1

    @property
    def in_features(self) -> int:
        return int(self._arrays[0].shape[1])

    def splits(self) -> Splits:
        features, labels = self._arrays
        cfg = self.data_cfg
        train_idx, val_idx, test_idx = split_indices(
            len(labels), labels, cfg.test_fraction, cfg.validation_fraction, cfg.split_seed
        )
        if cfg.train_limit is not None:
            train_idx = train_idx[: cfg.train_limit]
        full = FeatureDataset(features, labels)
        test = Subset(full, test_idx.tolist())
        if len(val_idx):
            return Splits(Subset(full, train_idx.tolist()), Subset(full, val_idx.tolist()), test, "validation")
        return Splits(Subset(full, train_idx.tolist()), test, test, "test")

    def collate(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {
            "inputs": torch.stack([it["inputs"] for it in items]),
            "labels": torch.stack([it["labels"] for it in items]),
        }

    def build_student(self) -> nn.Module:
        cfg = self.student_cfg
        if cfg.init:
            model = self._load(cfg.init, "student.init")
        else:
            model = MLPClassifier(
                self.in_features, cfg.hidden, self.num_classes, dropout=cfg.dropout, activation=cfg.activation
            )
        self._check_shape(model, "student")
        return model

    def load_teacher(self, ref: str, field: str = "teacher.model") -> nn.Module:
        model = self._load(ref, field)
        self._check_shape(model, field)
        return model

    def teacher_weight_files(self, ref: str, field: str = "teacher.model") -> list[Path]:
        return resolve_model_ref(ref, field=field).weight_files()

    def data_files(self) -> list[Path]:
        if self.data_cfg.dataset == "mnist":  # a teacher cache's fingerprint covers the images it was made of
            return [data_dir() / "mnist" / MNIST_IMAGES, data_dir() / "mnist" / MNIST_LABELS]
        return [Path(self.data_cfg.path)] if self.data_cfg.dataset == "npz" and self.data_cfg.path else []

    def _load(self, ref: str, field: str) -> nn.Module:
        location = resolve_model_ref(ref, field=field)
        if location.kind == "hub":  # `runs/model` reads as a hub id; classifiers are never on the hub
            raise ModelRefError(
                f"{field}: folder {ref} does not exist; check the path (relative paths start where kdforge runs)"
            )
        if location.path is None or not is_kdforge_folder(location.path):
            raise ModelRefError(
                f"{field}: {ref} is not a kdforge classifier folder; feature-vector classification distills"
                " MLPs saved by kdforge (train one with a recipe that has no teacher)"
            )
        return load_kdforge_model(location.path, field=field)

    def _check_shape(self, model: nn.Module, who: str) -> None:
        config = getattr(model, "config", {})
        if config.get("in_features") != self.in_features or config.get("num_classes") != self.num_classes:
            raise RecipeError(
                f"{who}: the model takes {config.get('in_features')} features and predicts"
                f" {config.get('num_classes')} classes, but the data has {self.in_features} features and"
                f" {self.num_classes} classes"
            )

    def adapter(self, model: nn.Module, batch: dict[str, Any], fields: frozenset[str]) -> ModelOutputs:
        weight = next(model.parameters())
        inputs = batch["inputs"].to(device=weight.device, dtype=weight.dtype)
        if not fields & {"hidden", "hidden_states"}:
            return ModelOutputs(logits=model(inputs))
        logits, hidden_states = model(inputs, output_hidden_states=True)
        if "hidden" in fields and not hidden_states:
            raise RecipeError(
                "objective: the 'hidden' output is the last hidden layer's features, and an MLP without hidden"
                " layers has none; give the student and the teacher at least one hidden layer"
            )
        return ModelOutputs(
            logits=logits if "logits" in fields else None,
            hidden=hidden_states[-1] if "hidden" in fields else None,
            hidden_states=hidden_states if "hidden_states" in fields else None,
        )

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataset: Dataset) -> Evaluation:
        model.eval()
        logits = []
        labels = []
        size = self.recipe.evaluation.batch_size
        for start in range(0, len(dataset), size):
            batch = self.collate([dataset[i] for i in range(start, min(start + size, len(dataset)))])
            logits.append(self.adapter(model, batch, frozenset({"logits"})).logits.float().cpu())
            labels.append(batch["labels"])
        all_logits = torch.cat(logits)
        y_true = torch.cat(labels).numpy()
        y_pred = all_logits.argmax(-1).numpy()
        metrics = {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        }
        return Evaluation(metrics=metrics, logits=all_logits)

    def save_model(self, model: nn.Module, folder: Path, card: str) -> Path:
        return save_kdforge_model(model, folder, extra_files={"README.md": card})

    def load_saved(self, folder: Path) -> nn.Module:
        return load_kdforge_model(folder)
