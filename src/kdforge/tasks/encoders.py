"""What the text-encoder tasks share: loading encoders, building students, encoding, evaluating, saving.

Teacher and student are sentence-transformers models (:mod:`kdforge.models.sentence_encoder`).
The student is a subset of the teacher's layers or a pretrained compact encoder; both
must use the teacher's vocabulary, because one tokenization feeds both models.

Evaluation is retrieval on a BEIR-layout folder (nDCG@10, Recall@100, MRR@10 through
ranx) and, when the recipe names one, WikiQA answer selection (MAP, MRR over each
question's candidates), plus the median latency of one query. The runner adds
documents/s and size. The saved student is a sentence-transformers folder.
"""

from __future__ import annotations

import os
import shutil
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from torch import nn
from torch.utils.data import Dataset
from transformers import AutoTokenizer

from kdforge.data.beir import BeirData, load_beir, load_wikiqa, resolve_data_path, wikiqa_to_beir
from kdforge.distributed import main_first
from kdforge.errors import RecipeError
from kdforge.eval.retrieval import evaluate_candidate_ranking, evaluate_dense_retrieval, query_latency
from kdforge.models.from_teacher import evenly_spaced_layers
from kdforge.models.refs import resolve_model_ref
from kdforge.models.sentence_encoder import (
    load_encoder,
    run_encoder,
    same_vocabulary,
    transformer_of,
    uses_cosine,
    with_layers,
)
from kdforge.outputs import ModelOutputs
from kdforge.progress import counting_progress
from kdforge.settings import cache_dir
from kdforge.signals import CacheTeacherConfig, OnlineTeacherConfig
from kdforge.signals.fingerprint import files_digest, value_digest
from kdforge.tasks.base import Evaluation, Task
from kdforge.tasks.encoder_config import EncoderStudent, RetrievalTest

#: token-level fields; their terms count real tokens (``token_mask``) unless the recipe says otherwise
TOKEN_FIELDS = ("hidden_states", "attentions", "qkv", "values")


class RetrievalSet(Dataset):
    """A test collection; its items are the documents (what throughput is timed on)."""

    def __init__(self, data: BeirData, wikiqa: BeirData | None = None):
        self.data = data
        self.wikiqa = wikiqa
        self.doc_ids = list(data.corpus)

    def __len__(self) -> int:
        return len(self.doc_ids)

    def __getitem__(self, index: int) -> str:
        return self.data.corpus[self.doc_ids[index]]


def limit_collection(data: BeirData, query_limit: int | None, corpus_limit: int | None) -> BeirData:
    """The first ``query_limit`` queries, searched among their judged documents plus the first
    ``corpus_limit`` others (a small, still meaningful collection for quick runs and tests)."""
    queries = dict(list(data.queries.items())[:query_limit]) if query_limit else data.queries
    qrels = {q: data.qrels[q] for q in queries}
    if corpus_limit is None:
        return BeirData(data.corpus, queries, qrels, data.pools)
    judged = {d for judgements in qrels.values() for d in judgements}
    others = [d for d in data.corpus if d not in judged][:corpus_limit]
    keep = judged | set(others)
    corpus = {d: text for d, text in data.corpus.items() if d in keep}
    pools = {q: [d for d in data.pools[q] if d in keep] for q in queries} if data.pools else None
    return BeirData(corpus, queries, qrels, pools)


def tokenizer_files_of(ref: str | None) -> list[Path]:
    """The tokenizer files of teacher ``ref``'s folder (a cache is valid only for the same tokenizer)."""
    location = resolve_model_ref(ref, field="teacher.model") if ref else None
    if location is None or location.path is None:
        return []
    return sorted(p for p in location.path.iterdir() if p.name.startswith(("tokenizer", "vocab", "special_tokens")))


def field_masks(fields: tuple[str, ...] = TOKEN_FIELDS, mask: str = "token_mask") -> dict[str, str]:
    return {name: mask for name in fields}


def internals(model: SentenceTransformer, inputs: dict[str, torch.Tensor], fields: frozenset[str]) -> dict[str, Any]:
    """Run the encoder and keep what ``fields`` need (per-layer tuples for token-level fields)."""
    out = run_encoder(
        model,
        inputs,
        hidden_states="hidden_states" in fields,
        attentions="attentions" in fields,
        qkv=bool(fields & {"qkv", "values"}),
    )
    if "values" in fields:
        out["values"] = tuple(v for _, _, v in out["qkv"])
    return out


def similarity(model: SentenceTransformer, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Scores the way the model is meant to be used: dot product or (default) cosine."""
    if not uses_cosine(model):
        return a @ b.T
    return F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T


def scoring_rows(model: nn.Module, emb: np.ndarray) -> np.ndarray:
    """Embeddings whose inner products are the model's scores: unit rows unless it scores by dot product."""
    if not uses_cosine(model):
        return emb
    return emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)


class EncoderTask(Task):
    """Shared base of ``embedding`` and ``ranking``; subclasses supply data, collate and the adapter."""

    student_schema = EncoderStudent
    primary_metric = "ndcg@10"
    throughput_unit = "documents/s"
    card_library = "sentence-transformers"
    load_hint = "from sentence_transformers import SentenceTransformer\nmodel = SentenceTransformer({folder!r})"
    output_fields: ClassVar[tuple[str, ...]] = ("embeddings", "scores", *TOKEN_FIELDS)

    # ---- models -------------------------------------------------------------------------
    def teacher_ref(self) -> str | None:
        teacher = self.recipe.teacher
        if isinstance(teacher, (OnlineTeacherConfig, CacheTeacherConfig)):
            return teacher.model
        return None

    def _load(self, ref: str, field: str) -> SentenceTransformer:
        cfg = self.student_cfg
        # a student section without pooling settings (a sparse student) leaves the defaults
        return load_encoder(
            ref,
            field=field,
            pooling=getattr(cfg, "pooling", "mean"),
            normalize=getattr(cfg, "normalize", True),
            max_length=self.data_cfg.max_length,
            tokenizer_from=self.teacher_ref(),
        )

    def load_teacher(self, ref: str, field: str = "teacher.model") -> nn.Module:
        model = self._teacher_cache.get(ref)
        if model is None:
            model = self._teacher_cache[ref] = self._load(ref, field)
        return model

    @cached_property
    def _teacher_cache(self) -> dict[str, SentenceTransformer]:
        return {}

    def build_student(self) -> nn.Module:
        cfg = self.student_cfg
        teacher_ref = self.teacher_ref()
        if cfg.model is not None:
            student = self._load(cfg.model, "student.model")
        else:
            if teacher_ref is None:
                raise RecipeError(
                    "student.layers: a student cut from the teacher's layers needs teacher.model (an online"
                    " teacher, or a cache that names its model); or give student.model"
                )
            teacher = self.load_teacher(teacher_ref)
            if not isinstance(teacher, SentenceTransformer):
                raise RecipeError(
                    f"student: the teacher {teacher_ref} is a cross-encoder, whose layers do not make a bi-encoder;"
                    " give student.model (a pretrained bi-encoder to start from)"
                )
            total = transformer_of(teacher, "teacher.model").config.num_hidden_layers
            if cfg.layers is not None:
                layers = cfg.layers
            else:
                if cfg.num_layers > total:
                    raise RecipeError(f"student.num_layers: {cfg.num_layers} exceeds the teacher's {total} layers")
                layers = [total - 1] if cfg.num_layers == 1 else evenly_spaced_layers(total, cfg.num_layers)
            student = with_layers(teacher, layers, "student.layers" if cfg.layers is not None else "student.num_layers")
        if teacher_ref is not None and not same_vocabulary(student, self.load_teacher(teacher_ref)):
            raise RecipeError(
                "student.model: its vocabulary differs from the teacher's; both encoders read the same"
                " tokens, so pick a student with the teacher's tokenizer"
            )
        # a copy of the (frozen) teacher's layers must train
        for p in student.parameters():
            p.requires_grad_(True)
        return student.train()

    @cached_property
    def tokenizer(self):
        cfg = self.student_cfg
        own = getattr(cfg, "model", None)  # a student that is not an encoder (an index) reads the teacher's tokens
        source = own if own is not None else self.teacher_ref()
        location = resolve_model_ref(source, field="student.model")
        if getattr(location, "onnx_file", None):
            location = resolve_model_ref(self.teacher_ref(), field="teacher.model")
        return AutoTokenizer.from_pretrained(location.source)

    def tokens(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def teacher_weight_files(self, ref: str, field: str = "teacher.model") -> list[Path]:
        return resolve_model_ref(ref, field=field).weight_files()

    def tokenizer_files(self) -> list[Path]:
        return tokenizer_files_of(self.teacher_ref())

    # ---- evaluation -----------------------------------------------------------------------
    def test_set(self) -> RetrievalSet:
        cfg: RetrievalTest = self.data_cfg.test
        data = limit_collection(
            load_beir(cfg.beir, cfg.split, field="data.test.beir"), cfg.query_limit, cfg.corpus_limit
        )
        wikiqa = None
        if cfg.wikiqa is not None:
            questions = load_wikiqa(cfg.wikiqa, cfg.wikiqa_split, field="data.test.wikiqa")
            wikiqa = wikiqa_to_beir(questions[: cfg.wikiqa_limit] if cfg.wikiqa_limit else questions)
        return RetrievalSet(data, wikiqa)

    def test_files(self) -> list[Path]:
        cfg: RetrievalTest = self.data_cfg.test
        root = resolve_data_path(cfg.beir, "data.test.beir")
        return [root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / f"{cfg.split}.tsv"]

    @torch.no_grad()
    def encode(self, model: SentenceTransformer, texts: list[str], max_length: int, what: str = "") -> np.ndarray:
        """Embeddings [N, D] (float32) in the order of ``texts``; batches of similar lengths go together."""
        model.eval()
        size = self.recipe.evaluation.batch_size
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.zeros((len(texts), 0), dtype=np.float32)
        chunks = []
        show = len(texts) > 4 * size and what
        with counting_progress(transient=True) as progress:
            bar = progress.add_task(f"encoding {what}", total=len(texts), visible=bool(show))
            for start in range(0, len(texts), size):
                index = order[start : start + size]
                inputs = self.tokens([texts[i] for i in index], max_length)
                chunks.append(run_encoder(model, inputs)["sentence_embedding"].float().cpu().numpy())
                progress.advance(bar, len(index))
        if chunks:
            stacked = np.concatenate(chunks)
            out = np.empty_like(stacked)
            out[order] = stacked
        return out

    def query_max_length(self) -> int:
        return self.data_cfg.max_length

    def cached_encode(
        self,
        model: SentenceTransformer,
        ref: str,
        texts: list[str],
        max_length: int,
        what: str,
        field: str = "data.miner",
    ) -> np.ndarray:
        """A teacher's embeddings (not normalised), kept in the kdforge cache (``KDFORGE_CACHE_DIR/embeddings``):
        the same weights, texts and length give the same rows, so later runs read them back."""
        files = resolve_model_ref(ref, field=field).weight_files()
        key = value_digest([files_digest(files), ref if not files else "", value_digest(texts), max_length])
        path = cache_dir() / "embeddings" / f"{key}.npy"

        def read_or_encode() -> np.ndarray:
            if path.is_file():
                return np.load(path)
            emb = self.encode(model, texts, max_length, what)
            if files:  # a hub model without local files has no stable identity to cache under
                path.parent.mkdir(parents=True, exist_ok=True)
                # a name of this process's own: two runs sharing the cache may write the same key at once
                tmp = path.with_name(f".{key}.{os.getpid()}.tmp.npy")
                np.save(tmp, emb)
                tmp.replace(path)
            return emb

        # on several processes the main one encodes and writes, the others read its file
        return main_first(read_or_encode)

    def encoder(self, model: SentenceTransformer, max_length: int, what: str = ""):
        """``texts -> [N, D]`` for the retrieval evaluation: unit rows unless the model scores by dot product."""

        def encode(texts: list[str]) -> np.ndarray:
            return scoring_rows(model, self.encode(model, texts, max_length, what))

        return encode

    def _retrieval(self, model: SentenceTransformer, data: BeirData, k: int, label: str) -> dict[str, float]:
        # one call per side: encode() batches by length itself and shows the progress
        queries = self.encoder(model, self.query_max_length(), f"{label} queries")
        docs = self.encoder(model, self.data_cfg.max_length, f"{label} documents")
        everything = max(len(data.corpus), len(data.queries), 1)
        if data.pools is not None:  # each query ranks its own candidates (WikiQA)
            return evaluate_candidate_ranking(data, encode_queries=queries, encode_docs=docs, batch_size=everything)
        metrics = ("ndcg@10", f"recall@{k}", "mrr@10")
        return evaluate_dense_retrieval(queries, docs, data, k=k, batch_size=everything, metrics=metrics)

    def evaluate(self, model: nn.Module, dataset: Dataset) -> Evaluation:
        assert isinstance(dataset, RetrievalSet)
        cfg: RetrievalTest = self.data_cfg.test
        metrics = self._retrieval(model, dataset.data, cfg.k, "test")
        if dataset.wikiqa is not None:
            metrics.update(
                {f"wikiqa_{k}": v for k, v in self._retrieval(model, dataset.wikiqa, cfg.k, "wikiqa").items()}
            )
        queries = list(dataset.data.queries.values())[: cfg.latency_queries]
        metrics["query_ms"] = query_latency(self.encoder(model, self.query_max_length()), queries)
        return Evaluation(metrics=metrics)

    def throughput_batch(self, dataset: Dataset, batch_size: int) -> dict[str, Any]:
        texts = [dataset[i % len(dataset)] for i in range(batch_size)]
        return self.tokens(texts, self.data_cfg.max_length)

    def throughput_items(self, batch: dict[str, Any]) -> int:
        return len(batch["input_ids"])

    def forward_for_speed(self, model: nn.Module):
        return lambda batch: run_encoder(model, batch)

    # ---- saving -----------------------------------------------------------------------------
    def save_model(self, model: nn.Module, folder: Path, card: str) -> Path:
        """A sentence-transformers folder (``SentenceTransformer(folder)`` loads it), written aside
        and moved into place, so a failure never leaves half a model."""
        from kdforge.models.store import replace_folder

        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save(str(tmp), create_model_card=False)
        (tmp / "README.md").write_text(card)
        replace_folder(tmp, folder)
        return folder

    def load_saved(self, folder: Path) -> nn.Module:
        return SentenceTransformer(str(folder), device="cpu", local_files_only=True)


def encoder_outputs(
    model: SentenceTransformer, inputs: dict[str, torch.Tensor], fields: frozenset[str]
) -> tuple[torch.Tensor, ModelOutputs]:
    """The sentence embeddings and the token-level fields asked for."""
    out = internals(model, inputs, fields)
    return out["sentence_embedding"], ModelOutputs(
        hidden_states=out.get("hidden_states"),
        attentions=out.get("attentions"),
        qkv=out.get("qkv"),
        values=out.get("values"),
    )
