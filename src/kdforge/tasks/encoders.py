"""The sentence-encoder model family, and helpers every text-encoder task shares.

:class:`SentenceEncoderFamily` (a :class:`~kdforge.tasks.parts.ModelFamily`) holds what the
``embedding`` and ``ranking`` tasks do with their models, and what ``sparse_retriever``
does with its dense teachers and miner: load teachers (sentence-transformers bi-encoders,
and cross-encoders for pair data), build students (a subset of the teacher's layers or a
pretrained compact encoder, on the teacher's vocabulary, because one tokenization feeds
both), run them to named outputs, encode texts (with the kdforge embedding cache), save
a sentence-transformers folder and time the document side. ``text_classification``
reads the token-level helpers (:func:`internals`, :func:`field_masks`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import CrossEncoder, SentenceTransformer
from torch import nn
from torch.utils.data import Dataset
from transformers import AutoTokenizer

from kdforge.data.beir import BeirData
from kdforge.distributed import batch_items, batch_rows, main_first
from kdforge.errors import RecipeError
from kdforge.eval.retrieval import search
from kdforge.models.from_teacher import evenly_spaced_layers
from kdforge.models.layer_importance import score_blocks, selection_record
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
from kdforge.recipe import Recipe
from kdforge.settings import cache_dir
from kdforge.signals import CacheTeacherConfig, OnlineTeacherConfig
from kdforge.signals.fingerprint import files_digest, value_digest
from kdforge.tasks.parts import SafetensorsFolderFamily
from kdforge.tasks.retrieval import Searched

#: token-level fields; their terms count real tokens (``token_mask``) unless the recipe says otherwise
TOKEN_FIELDS = ("hidden_states", "attentions", "qkv", "values")


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


def is_cross_encoder(path: Path | None) -> bool:
    """Whether ``path`` holds a sequence-classification model (a cross-encoder), not a sentence encoder."""
    if path is None or not (path / "config.json").is_file() or (path / "modules.json").is_file():
        return False
    architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    return any(name.endswith("ForSequenceClassification") for name in architectures)


def in_batch_layout(scores: torch.Tensor, own: int | None = None, first: int = 0) -> torch.Tensor:
    """``[B, B(1+K)]`` query-by-document scores reordered so that each row starts with its own
    (positive, K negatives) and continues with the other queries' documents, in batch order.

    With the positive still in column 0, ``margin_mse`` pairs it with every other document
    of the batch and ``listwise_kl`` spreads over all of them: TAS-B's in-batch supervision
    (Hofstätter et al. 2021), whose topic-clustered batches make these negatives hard.

    On several processes the rows are this process's queries and the columns the documents
    of the whole global batch: ``own`` is 1+K and ``first`` the global index of the first row.
    (A stand-in share, whose rows are not in the batch, gets clamped columns; it is not counted.)
    """
    batch, columns = scores.shape
    own = columns // batch if own is None else own
    rows = first + torch.arange(batch, device=scores.device).unsqueeze(1)
    everything = torch.arange(columns, device=scores.device).expand(batch, columns)
    start = rows * own
    # own block first, then the columns before it, then those after it
    shifted = torch.where(everything < own, start + everything, everything)
    shifted = torch.where((everything >= own) & (everything < start + own), everything - own, shifted)
    return scores.gather(1, shifted.clamp_max(columns - 1))


def save_sentence_transformers(model: nn.Module, folder: Path, card: str) -> Path:
    """A sentence-transformers folder (``SentenceTransformer(folder)``, ``SparseEncoder(folder)`` load it),
    written aside and moved into place, so a failure never leaves half a model."""
    from kdforge.models.store import replace_folder

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(str(tmp), create_model_card=False)
    (tmp / "README.md").write_text(card)
    replace_folder(tmp, folder)
    return folder


def recipe_teacher_ref(recipe: Recipe) -> str | None:
    """The model of a recipe's online or cache teacher (None for a served teacher or an ensemble)."""
    teacher = recipe.teacher
    if isinstance(teacher, (OnlineTeacherConfig, CacheTeacherConfig)):
        return teacher.model
    return None


class SentenceEncoderFamily(SafetensorsFolderFamily):
    """Model family: sentence-transformers bi-encoders (:mod:`kdforge.models.sentence_encoder`).

    The student is a subset of the teacher's layers or a pretrained compact encoder, and must use the
    teacher's vocabulary: one tokenization feeds both. ``layout`` is the batch the data source collates:

    - ``"texts"`` (unlabeled texts): ``embeddings`` ``[B, D]``; ``scores``, the in-batch similarities
      ``[B, B]`` with the diagonal ``-inf``; per-layer ``hidden_states``, ``attentions``, ``qkv``, ``values``;
    - ``"pairs"`` (query, positive, K negatives): ``scores`` ``[B, 1+K]`` (``[B, B(1+K)]`` with
      ``data.in_batch``), the positive first, and ``embeddings``, queries then documents; a teacher may
      then also be a ``CrossEncoder`` (a sequence-classification folder), which gives scores only.

    ``teacher_ref`` is the teacher the student is cut from and whose tokenizer reads every text (the
    recipe's, :func:`recipe_teacher_ref`, or None); ``tokenizer`` replaces the tokenizer (a task whose
    student is no sentence encoder reads with its own); ``miner`` is the bi-encoder that mines negatives
    and searches for a cross-encoder (``data.miner``; None: the teacher).
    """

    throughput_unit = "documents/s"
    card_library = "sentence-transformers"
    load_hint = "from sentence_transformers import SentenceTransformer\nmodel = SentenceTransformer({folder!r})"

    def __init__(
        self,
        recipe: Recipe,
        student_cfg: Any,
        data_cfg: Any,
        *,
        layout: Literal["texts", "pairs"],
        teacher_ref: str | None,
        tokenizer: Callable[[], Any] | None = None,
        miner: str | None = None,
    ):
        self.recipe, self.student_cfg, self.data_cfg = recipe, student_cfg, data_cfg
        self.layout = layout
        self.teacher_ref = teacher_ref
        self._tokenizer = tokenizer
        self.miner_ref = miner
        self._teachers: dict[str, nn.Module] = {}
        #: training texts the teacher's layers are scored on (student.select); None: the data gives none
        self.calibration_texts: Callable[[], list[str]] | None = None
        #: how the student was built from the teacher, for the run's training info (``layer_selection``)
        self.construction: dict[str, Any] = {}

    # ---- teacher and student ------------------------------------------------------------
    def _load(self, ref: str, field: str) -> SentenceTransformer:
        cfg = self.student_cfg
        # a student section without pooling settings (a sparse student) leaves the defaults
        return load_encoder(
            ref,
            field=field,
            pooling=getattr(cfg, "pooling", "mean"),
            normalize=getattr(cfg, "normalize", True),
            max_length=self.data_cfg.max_length,
            tokenizer_from=self.teacher_ref,
        )

    def load_teacher(self, ref: str, field: str = "teacher.model") -> nn.Module:
        if self.layout == "pairs":
            location = resolve_model_ref(ref, field=field)
            if is_cross_encoder(location.path):
                cached = self._teachers.get(ref)
                if cached is None:
                    cached = self._teachers[ref] = CrossEncoder(
                        str(location.path), device="cpu", max_length=self.data_cfg.max_length
                    )
                return cached
        model = self._teachers.get(ref)
        if model is None:
            model = self._teachers[ref] = self._load(ref, field)
        return model

    def miner(self) -> SentenceTransformer:
        """The bi-encoder that searches the corpus where the teacher cannot: ``data.miner``, else the teacher."""
        ref = self.miner_ref or self.teacher_ref
        field = "data.miner" if self.miner_ref else "teacher.model"
        if ref is None:
            raise RecipeError("data.miner: name a bi-encoder to mine negatives with (the teacher has no model)")
        model = self.load_teacher(ref, field)
        if not isinstance(model, SentenceTransformer):
            raise RecipeError(
                f"{field}: {ref} is a cross-encoder, which cannot search a corpus; set data.miner to a bi-encoder"
            )
        return model

    def build_student(self) -> nn.Module:
        cfg = self.student_cfg
        teacher_ref = self.teacher_ref
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
                if getattr(cfg, "select", "even") != "even":
                    layers = self._scored_layers(teacher, cfg)
                else:
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

    def _scored_layers(self, teacher: SentenceTransformer, cfg: Any) -> list[int]:
        """The layers ``cfg.select`` keeps, scored on the first ``cfg.calibration_batches`` batches of training
        texts; what was scored and chosen is kept for the run's training info (``layer_selection``)."""
        if self.calibration_texts is None:
            raise RecipeError(
                f"student.select: {cfg.select} scores the teacher's layers on training texts, which this task's data"
                " does not give; use select: even or student.layers"
            )
        size = self.recipe.training.batch_size
        texts = self.calibration_texts()[: size * cfg.calibration_batches]
        if not texts:
            raise RecipeError("student.select: the training texts are empty; nothing to score the layers on")
        inner = transformer_of(teacher, "teacher.model")
        blocks = inner.encoder.layer
        batches = [self.tokens(texts[s : s + size], self.data_cfg.max_length) for s in range(0, len(texts), size)]
        device = next(inner.parameters()).device
        scores = score_blocks(blocks, batches, lambda b: inner(**{k: v.to(device) for k, v in b.items()}))
        layers, self.construction["layer_selection"] = selection_record(scores, cfg.num_layers, cfg.select)
        return layers

    # ---- tokens and embeddings ------------------------------------------------------------
    @cached_property
    def tokenizer(self):
        if self._tokenizer is not None:
            return self._tokenizer()
        # a student that is not an encoder (an index) reads the teacher's tokens
        own = getattr(self.student_cfg, "model", None)
        source = own if own is not None else self.teacher_ref
        location = resolve_model_ref(source, field="student.model")
        if getattr(location, "onnx_file", None):
            location = resolve_model_ref(self.teacher_ref, field="teacher.model")
        return AutoTokenizer.from_pretrained(location.source)

    def tokens(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        encoded = self.tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        return {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

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
        """``texts -> [N, D]`` for retrieval: unit rows unless the model scores by dot product."""

        def encode(texts: list[str]) -> np.ndarray:
            return scoring_rows(model, self.encode(model, texts, max_length, what))

        return encode

    @torch.no_grad()
    def score_pairs(self, teacher: nn.Module, query: str, docs: list[str]) -> np.ndarray:
        """A teacher's scores of one query's documents (a cross-encoder's, or a bi-encoder's similarities)."""
        if isinstance(teacher, CrossEncoder):
            return np.asarray(teacher.predict([(query, d) for d in docs], show_progress_bar=False), dtype=np.float32)
        q = self.encoder(teacher, self.data_cfg.query_max_length)([query])
        d = self.encoder(teacher, self.data_cfg.max_length)(docs)
        return d @ q[0]

    # ---- outputs -------------------------------------------------------------------------
    def adapter(self, model: nn.Module, batch: dict[str, Any], fields: frozenset[str]) -> ModelOutputs:
        if self.layout == "texts":
            return self._text_outputs(model, batch, fields)
        if isinstance(model, CrossEncoder):
            return self._cross_encoder_outputs(model, batch, fields)
        return self._pair_outputs(model, batch, fields)

    def _text_outputs(self, model: nn.Module, batch: dict[str, Any], fields: frozenset[str]) -> ModelOutputs:
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

    def _pair_outputs(self, model: nn.Module, batch: dict[str, Any], fields: frozenset[str]) -> ModelOutputs:
        queries = {
            k.removeprefix("query_"): v for k, v in batch.items() if k.startswith("query_") and k != "query_texts"
        }
        docs = {k.removeprefix("doc_"): v for k, v in batch.items() if k.startswith("doc_") and k != "doc_texts"}
        q = run_encoder(model, queries)["sentence_embedding"]
        d = run_encoder(model, docs)["sentence_embedding"]
        out = ModelOutputs()
        if "scores" in fields:
            qs, ds = (F.normalize(q, dim=-1), F.normalize(d, dim=-1)) if uses_cosine(model) else (q, d)
            if self.data_cfg.in_batch:  # on several processes, against the whole global batch's documents
                own = len(ds) // len(qs)
                batch_docs, first = batch_rows(ds)
                out.scores = in_batch_layout(qs @ batch_docs.T, own, first // own)
            else:
                out.scores = torch.einsum("bd,bkd->bk", qs, ds.view(len(q), -1, d.shape[-1]))
        if "embeddings" in fields:
            out.embeddings = torch.cat([q, d])
        return out

    def _cross_encoder_outputs(
        self, model: CrossEncoder, batch: dict[str, Any], fields: frozenset[str]
    ) -> ModelOutputs:
        if fields - {"scores"}:
            raise RecipeError(
                f"objective: a cross-encoder teacher gives scores only, not {', '.join(sorted(fields - {'scores'}))}"
            )
        queries, docs = batch["query_texts"], batch["doc_texts"]
        home = batch["labels"].device
        if self.data_cfg.in_batch:  # every query against every document of the (global) batch
            own = len(docs) // len(queries)
            batch_docs, first = batch_items(docs)
            pairs = [(query, doc) for query in queries for doc in batch_docs]
            scores = model.predict(pairs, convert_to_tensor=True, show_progress_bar=False)
            scores = scores.float().to(home).view(len(queries), len(batch_docs))
            return ModelOutputs(scores=in_batch_layout(scores, own, first // own))
        per_query = len(docs) // len(queries)
        pairs = [(queries[i // per_query], doc) for i, doc in enumerate(docs)]
        scores = model.predict(pairs, convert_to_tensor=True, show_progress_bar=False)
        return ModelOutputs(scores=scores.float().to(home).view(len(queries), per_query))

    # ---- searching (the retrieval evaluator's hook) -------------------------------------------
    def search(self, model: nn.Module, data: BeirData, test: Any) -> Searched | None:
        """A cross-encoder re-ranks the miner's top-k (it cannot search); None for a bi-encoder, which the
        retrieval evaluator searches with by its embeddings (:meth:`encoder`)."""
        if not isinstance(model, CrossEncoder):
            return None
        k, query_max_length = test.k, self.data_cfg.query_max_length
        first = self.miner()
        query_ids, doc_ids = list(data.queries), list(data.corpus)
        q = self.encoder(first, query_max_length, "queries")([data.queries[i] for i in query_ids])
        d = self.encoder(first, self.data_cfg.max_length, "documents")([data.corpus[i] for i in doc_ids])
        _, indices = search(q, d, k)
        run = {}
        started = time.perf_counter()
        for row, qid in enumerate(query_ids):
            docs = [doc_ids[j] for j in indices[row] if j >= 0]
            pairs = [(data.queries[qid], data.corpus[doc]) for doc in docs]
            scores = model.predict(pairs, batch_size=self.recipe.evaluation.batch_size, show_progress_bar=False)
            run[qid] = {doc: float(score) for doc, score in zip(docs, scores)}

        def query_ms() -> float:  # the re-ranking's time per query, measured when the evaluator asks
            return (time.perf_counter() - started) * 1000 / max(len(query_ids), 1)

        return Searched(run, query_ms)

    # ---- speed and saving -------------------------------------------------------------------
    def throughput_batch(self, dataset: Dataset, batch_size: int) -> dict[str, Any]:
        texts = [dataset[i % len(dataset)] for i in range(batch_size)]
        return self.tokens(texts, self.data_cfg.max_length)

    def throughput_items(self, batch: dict[str, Any]) -> int:
        return len(batch["input_ids"])

    def forward_for_speed(self, model: nn.Module):
        if isinstance(model, CrossEncoder):  # one (query, document) pair per row: the documents' own tokens
            return lambda batch: model.model(**batch)
        return lambda batch: run_encoder(model, batch)

    def save_model(self, model: nn.Module, folder: Path, card: str) -> Path:
        return save_sentence_transformers(model, folder, card)

    def load_saved(self, folder: Path) -> nn.Module:
        return SentenceTransformer(str(folder), device="cpu", local_files_only=True)

    def tokenizer_files(self) -> list[Path]:
        return tokenizer_files_of(self.teacher_ref)


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
