"""A text classifier: a sentence-transformers encoder with a linear head on its pooled embedding.

Saved as a sentence-transformers folder (the encoder: ``SentenceTransformer(folder)``
loads it alone) plus ``classifier.json`` (class names, dropout) and
``head.safetensors``, so the encoder stays usable on its own and the classifier is
one call away: ``TextClassifier.load(folder).predict(texts)``. The head reads the
pooled embedding before any L2 normalisation (a unit sphere caps the logits' scale).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize
from torch import nn

from kdforge.errors import ModelRefError
from kdforge.models.sentence_encoder import run_encoder

CONFIG_FILE = "classifier.json"
HEAD_FILE = "head.safetensors"
FORMAT = "kdforge-text-classifier"


def is_text_classifier_folder(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / HEAD_FILE).is_file()


def without_normalize(encoder: SentenceTransformer) -> SentenceTransformer:
    """The encoder's modules minus a final Normalize (the head wants the raw pooled embedding)."""
    modules = [m for m in encoder if not isinstance(m, Normalize)]
    if len(modules) == len(encoder):
        return encoder
    stripped = SentenceTransformer(modules=modules, device="cpu")
    stripped.max_seq_length = encoder.max_seq_length
    return stripped


class TextClassifier(nn.Module):
    architecture = "text-classifier"

    def __init__(
        self, encoder: SentenceTransformer, labels: list[str], *, dropout: float = 0.1, multi_label: bool = False
    ):
        super().__init__()
        #: several labels per text: each logit is its own label's sigmoid (predict keeps those above 0.5)
        self.multi_label = multi_label
        self.encoder = without_normalize(encoder)
        self.labels = list(labels)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.encoder.get_embedding_dimension(), len(labels))
        self.config: dict[str, Any] = {"format": FORMAT, "labels": self.labels, "dropout": dropout}
        if multi_label:  # absent for single-label models, whose folders read as before
            self.config["multi_label"] = True

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits [B, C] of pooled embeddings [B, H] (what the head reads)."""
        return self.head(self.dropout(pooled))

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.classify(run_encoder(self.encoder, inputs)["sentence_embedding"])

    @torch.no_grad()
    def predict(self, texts: list[str], batch_size: int = 64) -> list[str] | list[list[str]]:
        """The class name of each text (for users of a saved classifier); multi-label: each text's names."""
        self.eval()
        names = []
        for start in range(0, len(texts), batch_size):
            inputs = self.tokenizer(
                texts[start : start + batch_size],
                padding=True,
                truncation=True,
                max_length=self.encoder.max_seq_length,
                return_tensors="pt",
            )
            logits = self(dict(inputs))
            if self.multi_label:
                names += [[self.labels[i] for i in row.nonzero().flatten().tolist()] for row in logits > 0]
            else:
                names += [self.labels[i] for i in logits.argmax(-1).tolist()]
        return names

    def save(self, folder: Path) -> None:
        self.encoder.save(str(folder), create_model_card=False)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}, folder / HEAD_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(self.config, indent=2))

    @classmethod
    def load(cls, folder: str | Path, *, field: str = "model") -> TextClassifier:
        folder = Path(folder)
        if not is_text_classifier_folder(folder):
            raise ModelRefError(
                f"{field}: {folder} is not a kdforge text classifier (no {CONFIG_FILE} and {HEAD_FILE}); train one"
                " with a text_classification recipe that has no teacher"
            )
        config = json.loads((folder / CONFIG_FILE).read_text())
        encoder = SentenceTransformer(str(folder), device="cpu", local_files_only=True)
        model = cls(
            encoder, config["labels"], dropout=config.get("dropout", 0.1), multi_label=config.get("multi_label", False)
        )
        model.head.load_state_dict(load_file(folder / HEAD_FILE))
        return model
