"""The MLP model family of ``classification``: kdforge's own multi-layer perceptrons.

:class:`MLPFamily` (a :class:`~kdforge.tasks.parts.ModelFamily`) builds the student
(:class:`~kdforge.models.mlp.MLPClassifier`, or a saved one with ``student.init``), loads
teachers saved by kdforge (never from the hub), checks that both fit the data's feature
width and classes, runs them to ``logits``, ``hidden`` (the last hidden layer's features)
and ``hidden_states``, and saves them as kdforge folders (``config.json`` and
``model.safetensors``, :mod:`kdforge.models.store`). It reads the feature table for the
data's shape and batches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from kdforge.errors import ModelRefError, RecipeError
from kdforge.models.mlp import MLPClassifier
from kdforge.models.refs import resolve_model_ref
from kdforge.models.store import is_kdforge_folder, load_kdforge_model, save_kdforge_model
from kdforge.outputs import ModelOutputs
from kdforge.recipe import Recipe, Strict
from kdforge.tasks.feature_data import FeatureTable
from kdforge.tasks.parts import SafetensorsFolderFamily


class MLPStudent(Strict):
    kind: Literal["mlp"] = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [32], description="hidden layer widths")
    dropout: float = Field(0.0, ge=0, lt=1)
    activation: Literal["relu", "gelu", "tanh"] = "relu"
    init: str | None = Field(None, description="a saved model to start from instead of random weights")


class MLPFamily(SafetensorsFolderFamily):
    """MLP classifiers saved as kdforge folders (see the module)."""

    throughput_unit = "examples/s"
    card_library = "kdforge"
    load_hint = "from kdforge.models.store import load_kdforge_model\nmodel = load_kdforge_model({folder!r})"

    def __init__(self, recipe: Recipe, student_cfg: MLPStudent, data: FeatureTable):
        self.recipe, self.student_cfg, self.data = recipe, student_cfg, data

    # ---- teacher and student ------------------------------------------------------------
    def build_student(self) -> nn.Module:
        cfg = self.student_cfg
        if cfg.init:
            model = self._load(cfg.init, "student.init")
        else:
            model = MLPClassifier(
                self.data.in_features, cfg.hidden, self.data.num_classes, dropout=cfg.dropout, activation=cfg.activation
            )
        self._check_shape(model, "student")
        return model

    def load_teacher(self, ref: str, field: str = "teacher.model") -> nn.Module:
        model = self._load(ref, field)
        self._check_shape(model, field)
        return model

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
        in_features, num_classes = self.data.in_features, self.data.num_classes
        if config.get("in_features") != in_features or config.get("num_classes") != num_classes:
            raise RecipeError(
                f"{who}: the model takes {config.get('in_features')} features and predicts"
                f" {config.get('num_classes')} classes, but the data has {in_features} features and"
                f" {num_classes} classes"
            )

    # ---- outputs ------------------------------------------------------------------------
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
    def logits(self, model: nn.Module, dataset: Dataset) -> torch.Tensor:
        """The model's logits [N, C] on ``dataset``, in its order (the model is left in eval mode)."""
        model.eval()
        logits = []
        size = self.recipe.evaluation.batch_size
        for start in range(0, len(dataset), size):
            batch = self.data.collate([dataset[i] for i in range(start, min(start + size, len(dataset)))])
            logits.append(self.adapter(model, batch, frozenset({"logits"})).logits.float().cpu())
        return torch.cat(logits)

    # ---- saving ---------------------------------------------------------------------------
    def save_model(self, model: nn.Module, folder: Path, card: str) -> Path:
        return save_kdforge_model(model, folder, extra_files={"README.md": card})

    def load_saved(self, folder: Path) -> nn.Module:
        return load_kdforge_model(folder)

    def tokenizer_files(self) -> list[Path]:
        return []

    # ---- speed ------------------------------------------------------------------------------
    def throughput_batch(self, dataset: Dataset, batch_size: int) -> dict[str, Any]:
        return self.data.collate([dataset[i % len(dataset)] for i in range(batch_size)])

    def forward_for_speed(self, model: nn.Module):
        return lambda batch: self.adapter(model, batch, frozenset({"logits"}))

    def throughput_items(self, batch: dict[str, Any]) -> int:
        return len(batch["inputs"])
