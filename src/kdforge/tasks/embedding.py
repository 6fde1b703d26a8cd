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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from kdforge.data.beir import load_beir, resolve_data_path
from kdforge.distributed import batch_rows
from kdforge.errors import DataError
from kdforge.objective import FIELD_MASKS
from kdforge.outputs import ModelOutputs
from kdforge.recipe import ObjectiveTerm
from kdforge.tasks.base import TASKS, Splits
from kdforge.tasks.encoder_config import EmbeddingData
from kdforge.tasks.encoders import EncoderTask, encoder_outputs, field_masks, similarity


class TextDataset(Dataset):
    def __init__(self, texts: list[str]):
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, index: int) -> str:
        return self.texts[index]


def read_text_file(path: Path, field: str) -> list[str]:
    """One text per line (.txt), or a ``text`` value per JSON line (.jsonl); blank lines are skipped."""
    texts = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            line = line.strip()
            if not line:
                continue
            if path.suffix == ".jsonl":
                try:
                    value = json.loads(line).get("text")
                except (json.JSONDecodeError, AttributeError):
                    raise DataError(f"{field}: {path}:{number} is not a JSON object") from None
                if not isinstance(value, str):
                    raise DataError(f"{field}: {path}:{number} has no string 'text'")
                texts.append(value)
            else:
                texts.append(line)
    if not texts:
        raise DataError(f"{field}: {path} holds no texts")
    return texts


@TASKS.register("embedding")
class EmbeddingTask(EncoderTask):
    name = "embedding"
    data_schema = EmbeddingData

    def train_texts(self) -> list[str]:
        cfg = self.data_cfg
        if cfg.text_file is not None:
            texts = read_text_file(resolve_data_path(cfg.text_file, "data.text_file"), "data.text_file")
        else:
            data = load_beir(cfg.beir, cfg.train_split, field="data.beir")
            texts = []
            if "corpus" in cfg.texts:
                texts += list(data.corpus.values())
            if "queries" in cfg.texts:
                texts += list(data.queries.values())
        return texts[: cfg.train_limit] if cfg.train_limit else texts

    def splits(self) -> Splits:
        test = self.test_set()
        return Splits(TextDataset(self.train_texts()), test, test, "test")

    def data_files(self) -> list[Path]:
        cfg = self.data_cfg
        if cfg.text_file is not None:
            files = [resolve_data_path(cfg.text_file, "data.text_file")]
        else:
            root = resolve_data_path(cfg.beir, "data.beir")
            files = [root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / f"{cfg.train_split}.tsv"]
        return files

    def collate(self, items: list[str]) -> dict[str, Any]:
        batch: dict[str, Any] = self.tokens(list(items), self.data_cfg.max_length)
        batch["token_mask"] = batch["attention_mask"].bool()
        batch[FIELD_MASKS] = field_masks()
        return batch

    def adapter(self, model: nn.Module, batch: dict[str, Any], fields: frozenset[str]) -> ModelOutputs:
        embeddings, out = encoder_outputs(model, batch, fields)
        if "embeddings" in fields:
            out.embeddings = embeddings
        if "scores" in fields:
            # on several processes, against the texts of the whole global batch, as on one
            batch_embeddings, first = batch_rows(embeddings)
            scores = similarity(model, embeddings, batch_embeddings)
            rows, columns = (torch.arange(n, device=scores.device) for n in scores.shape)
            own = columns.unsqueeze(0) == (first + rows).unsqueeze(1)  # each text with itself
            out.scores = scores.masked_fill(own, float("-inf"))
        return out

    def baseline_objective(self) -> list[ObjectiveTerm] | None:
        return None
