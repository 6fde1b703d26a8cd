"""The sparse-encoder model family: inference-free learned sparse retrievers, with dense and BM25 teachers.

The student encodes documents only (:mod:`kdforge.models.sparse_encoder`); a query is
its tokens weighted by their IDF on the training corpus (or 1 each, the ablation), so
serving a query runs no model, and search is a sum over the query tokens' posting
lists of an inverted index (:mod:`kdforge.eval.sparse_index`). Teachers are BM25
(``teacher.model: bm25``, through bm25s) and the dense teachers of a
:class:`~kdforge.tasks.encoders.SentenceEncoderFamily` in the pairs layout (bi-encoders,
cross-encoders), which this family holds as ``dense`` and which also mines the negatives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from sentence_transformers import SparseEncoder
from torch import nn
from torch.utils.data import Dataset
from transformers import AutoTokenizer

from kdforge.data.beir import BeirData
from kdforge.distributed import batch_items, batch_rows
from kdforge.errors import RecipeError
from kdforge.eval.retrieval import serving_latency
from kdforge.eval.sparse_index import SparseIndex, query_terms
from kdforge.models.bm25 import BM25_REF, BM25Scorer, BM25Settings
from kdforge.models.refs import load_with, resolve_model_ref
from kdforge.models.sparse_encoder import (
    build_sparse_encoder,
    document_transformer,
    document_weights,
    idf_weights,
    model_source,
    query_embedding,
    query_vectors,
)
from kdforge.outputs import ModelOutputs
from kdforge.progress import counting_progress
from kdforge.recipe import Recipe
from kdforge.signals import CacheTeacherConfig, OnlineTeacherConfig, teacher_members
from kdforge.tasks.encoder_config import RetrievalTest, SparseData, SparseStudent
from kdforge.tasks.encoders import SentenceEncoderFamily, in_batch_layout, save_sentence_transformers
from kdforge.tasks.retrieval import Searched

DOC_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_teachers(recipe: Recipe) -> list[str]:
    """The teacher models a recipe names, ensemble members included, in order."""
    return [
        m.model
        for _, m in teacher_members(recipe.teacher)
        if isinstance(m, (OnlineTeacherConfig, CacheTeacherConfig)) and m.model
    ]


def dense_teacher_ref(recipe: Recipe) -> str | None:
    """The dense teacher (it mines the negatives and sets the vocabulary): the first named model but BM25."""
    return next((ref for ref in model_teachers(recipe) if ref != BM25_REF), None)


class SparseEncoderFamily:
    """Model family: a ``SparseEncoder`` student, BM25 and dense teachers (see the module).

    ``corpus`` gives the training corpus (the data source's), on which the query IDF and BM25 are computed.
    Outputs: ``scores`` laid out as the ranking pairs' (``[B, B(1+K)]`` with ``data.in_batch``, else
    ``[B, 1+K]``) and ``doc_weights`` ``[B, 1+K, V]``; BM25 gives scores only.
    """

    throughput_unit = "documents/s"
    card_library = "sentence-transformers"
    load_hint = (
        "from sentence_transformers import SparseEncoder\n"
        "model = SparseEncoder({folder!r})\n"
        "docs = model.encode_document(texts)  # queries need no model: model.encode_query(queries)"
    )

    def __init__(
        self, recipe: Recipe, student_cfg: SparseStudent, data_cfg: SparseData, corpus: Callable[[], BeirData]
    ):
        self.recipe, self.student_cfg, self.data_cfg = recipe, student_cfg, data_cfg
        self._corpus = corpus
        # the dense teachers and the miner read the student's tokens
        self.dense = SentenceEncoderFamily(
            recipe,
            student_cfg,
            data_cfg,
            layout="pairs",
            teacher_ref=dense_teacher_ref(recipe),
            tokenizer=lambda: self.tokenizer,
            miner=data_cfg.miner,
        )

    @property
    def teacher_ref(self) -> str | None:
        return self.dense.teacher_ref

    # ---- teachers ----------------------------------------------------------------------
    def load_teacher(self, ref: str, field: str = "teacher.model") -> nn.Module:
        if ref == BM25_REF:
            return self.bm25
        return self.dense.load_teacher(ref, field)

    @cached_property
    def bm25(self) -> BM25Scorer:
        """BM25 over the whole training corpus (its IDF and lengths are the corpus's, not a batch's)."""
        return self.bm25_over(self._corpus().corpus)

    def bm25_over(self, corpus: dict[str, str]) -> BM25Scorer:
        """BM25 with the recipe's ``data.bm25`` settings, indexed on ``corpus``."""
        cfg = self.data_cfg.bm25
        return BM25Scorer(corpus, BM25Settings(cfg.k1, cfg.b, cfg.method, cfg.stemmer, cfg.stopwords))

    def teacher_weight_files(self, ref: str, field: str = "teacher.model") -> list[Path]:
        return [] if ref == BM25_REF else self.dense.teacher_weight_files(ref, field)

    def tokenizer_files(self) -> list[Path]:
        return self.dense.tokenizer_files()

    # ---- student -----------------------------------------------------------------------
    @cached_property
    def tokenizer(self):
        location = resolve_model_ref(self.student_cfg.model, field="student.model")
        if location.path is not None:  # the transformer inside the folder holds the tokenizer
            location = replace(location, path=Path(model_source(location)))
        return load_with(AutoTokenizer.from_pretrained, location, field="student.model")

    def tokens(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        return self.dense.tokens(texts, max_length)

    @cached_property
    def idf(self) -> torch.Tensor:
        """Query-side token weights: IDF on the training corpus (or 1 for every token: the ablation)."""
        special = self.tokenizer.all_special_ids
        if self.student_cfg.query_weights == "binary":
            weights = torch.ones(len(self.tokenizer))
            weights[special] = 0.0
            return weights
        return idf_weights(self.tokenizer, list(self._corpus().corpus.values()), special)

    def build_student(self) -> nn.Module:
        cfg = self.student_cfg
        student = build_sparse_encoder(
            cfg.model,
            field="student.model",
            idf=self.idf,
            max_length=self.data_cfg.max_length,
            layers=cfg.layers,
            head_bias=cfg.head_bias,
        )
        teacher_ref = self.teacher_ref
        if teacher_ref is not None:
            teacher = self.load_teacher(teacher_ref)
            teacher_vocab = getattr(teacher, "tokenizer", None)
            if teacher_vocab is not None and teacher_vocab.get_vocab() != self.tokenizer.get_vocab():
                raise RecipeError(
                    "student.model: its vocabulary differs from the dense teacher's; one tokenization feeds"
                    " both, so pick a student with the teacher's tokenizer"
                )
        return student.train()

    # ---- outputs -----------------------------------------------------------------------
    def adapter(self, model: nn.Module, batch: dict[str, Any], fields: frozenset[str]) -> ModelOutputs:
        if isinstance(model, BM25Scorer):
            return self._bm25_outputs(model, batch, fields)
        if not isinstance(model, SparseEncoder):
            return self.dense.adapter(model, batch, fields)
        queries = query_vectors(model, batch["query_input_ids"], batch["query_attention_mask"])
        weights = document_weights(model, {k: batch[f"doc_{k}"] for k in DOC_INPUTS if f"doc_{k}" in batch})
        out = ModelOutputs()
        if "scores" in fields:
            if self.data_cfg.in_batch:  # on several processes, against the whole global batch's documents
                batch_weights, first = batch_rows(weights)
                out.scores = self._layout(queries @ batch_weights.T, first)
            else:
                out.scores = self._layout(queries @ weights.T)
        if "doc_weights" in fields:
            out.doc_weights = weights.view(len(queries), -1, weights.shape[-1])
        return out

    def _layout(self, all_pairs: torch.Tensor, first_document: int = 0) -> torch.Tensor:
        """[B, B(1+K)] scores of every query against every document of the batch, as the ranking pairs lay
        them; on several processes, against the global batch's documents, ours from ``first_document``."""
        own = self.data_cfg.negatives_per_example + 1
        if self.data_cfg.in_batch:
            return in_batch_layout(all_pairs, own, first_document // own)
        batch = all_pairs.shape[0]
        return all_pairs.view(batch, batch, own)[torch.arange(batch), torch.arange(batch)]

    def _bm25_outputs(self, model: BM25Scorer, batch: dict[str, Any], fields: frozenset[str]) -> ModelOutputs:
        if fields - {"scores"}:
            raise RecipeError(f"objective: BM25 gives scores only, not {', '.join(sorted(fields - {'scores'}))}")
        candidates, first = (
            batch_items(batch["candidate_ids"]) if self.data_cfg.in_batch else (batch["candidate_ids"], 0)
        )
        scores = torch.from_numpy(model.scores(batch["query_texts"], candidates))
        return ModelOutputs(scores=self._layout(scores.to(batch["labels"].device), first))

    # ---- searching (the retrieval evaluator's hook) -------------------------------------------
    @torch.no_grad()
    def document_matrix(self, model: SparseEncoder, texts: list[str]) -> sp.csr_matrix:
        """``[N, V]`` sparse document weights, batches of similar lengths together."""
        model.eval()
        size = self.recipe.evaluation.batch_size
        order = np.argsort([-len(t) for t in texts], kind="stable")
        rows, cols, vals = [], [], []
        with counting_progress(transient=True) as progress:
            bar = progress.add_task("encoding documents", total=len(texts), visible=len(texts) > 4 * size)
            for start in range(0, len(texts), size):
                index = order[start : start + size]
                weights = document_weights(model, self.tokens([texts[i] for i in index], self.data_cfg.max_length))
                r, c = weights.nonzero(as_tuple=True)
                rows.append(index[r.numpy()])
                cols.append(c.numpy())
                vals.append(weights[r, c].float().numpy())
                progress.advance(bar, len(index))
        vocab = len(self.tokenizer)
        if not rows:
            return sp.csr_matrix((0, vocab), dtype=np.float32)
        return sp.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(len(texts), vocab)
        )

    def query_matrix(self, model: SparseEncoder, queries: list[str]) -> sp.csr_matrix:
        """``[Q, V]`` model-free query vectors (tokenizer and IDF only)."""
        tokens = self.tokens(queries, self.data_cfg.query_max_length)
        vectors = query_vectors(model, tokens["input_ids"], tokens["attention_mask"])
        return sp.csr_matrix(vectors.numpy())

    def search(self, model: nn.Module, data: BeirData, test: RetrievalTest) -> Searched | None:
        """The student through its inverted index, BM25 indexed on the test collection; other teachers as the
        dense family searches them."""
        if isinstance(model, BM25Scorer):
            return self._search_bm25(data, test)
        if not isinstance(model, SparseEncoder):
            return self.dense.search(model, data, test)
        k, query_max_length = test.k, self.data_cfg.query_max_length
        doc_ids, query_ids = list(data.corpus), list(data.queries)
        index = SparseIndex.build(self.document_matrix(model, [data.corpus[d] for d in doc_ids]))
        queries = self.query_matrix(model, [data.queries[q] for q in query_ids])
        run = {}
        for row, qid in enumerate(query_ids):
            top, scores = index.search(*query_terms(queries, row), k)
            run[qid] = {doc_ids[j]: float(s) for j, s in zip(top, scores)}

        idf = query_embedding(model).weight.detach()

        def serve(query: str) -> None:  # what a search server does per query: no model runs
            ids = self.tokenizer(query, truncation=True, max_length=query_max_length)["input_ids"]
            terms = np.unique(np.asarray(ids))
            weights = idf[terms].numpy()
            keep = weights > 0
            index.search(terms[keep], weights[keep], k)

        latency_queries = [data.queries[q] for q in query_ids[: test.latency_queries]]
        stats = {
            "doc_nonzeros": index.nonzeros_per_document(),
            "bytes_per_doc": index.nbytes() / max(index.documents, 1),
            "index_build_s": index.build_seconds,
        }
        return Searched(run, lambda: serving_latency(serve, latency_queries), stats)

    def _search_bm25(self, data: BeirData, test: RetrievalTest) -> Searched:
        """BM25 indexed on the test collection (its IDF is the collection's), searched one query at a time."""
        bm25 = self.bm25_over(data.corpus)
        k = test.k
        query_ids = list(data.queries)
        rows, scores = bm25.search([data.queries[q] for q in query_ids], k)
        run = {
            qid: {bm25.doc_ids[j]: float(s) for j, s in zip(rows[i], scores[i]) if s > 0}
            for i, qid in enumerate(query_ids)
        }
        latency_queries = [data.queries[q] for q in query_ids[: test.latency_queries]]
        postings = bm25.index.scores
        nbytes = sum(postings[name].nbytes for name in ("data", "indices", "indptr"))
        stats = {
            "doc_nonzeros": len(postings["data"]) / max(len(bm25.doc_ids), 1),
            "bytes_per_doc": nbytes / max(len(bm25.doc_ids), 1),
            "index_build_s": bm25.build_seconds,
        }
        return Searched(run, lambda: serving_latency(lambda query: bm25.search([query], k), latency_queries), stats)

    # ---- speed and saving -----------------------------------------------------------------
    def throughput_batch(self, dataset: Dataset, batch_size: int) -> dict[str, Any]:
        texts = [dataset[i % len(dataset)] for i in range(batch_size)]
        return {"texts": texts, **self.tokens(texts, self.data_cfg.max_length)}

    def throughput_items(self, batch: dict[str, Any]) -> int:
        return len(batch["input_ids"])

    def forward_for_speed(self, model: nn.Module):
        """Documents encoded per second: the document side's cost (queries cost no model)."""
        if isinstance(model, BM25Scorer):
            return lambda batch: model.tokenize(batch["texts"])
        if isinstance(model, SparseEncoder):
            return lambda batch: document_weights(model, {k: batch[k] for k in DOC_INPUTS if k in batch})
        encode = self.dense.forward_for_speed(model)
        return lambda batch: encode({k: batch[k] for k in DOC_INPUTS if k in batch})

    def save_model(self, model: nn.Module, folder: Path, card: str) -> Path:
        return save_sentence_transformers(model, folder, card)

    def load_saved(self, folder: Path) -> nn.Module:
        model = SparseEncoder(str(folder), device="cpu", local_files_only=True)
        document_transformer(model)  # a sparse encoder with a query/document router, as saved
        return model

    def saved_weight_files(self, folder: Path) -> list[Path]:
        return sorted(folder.rglob("*.safetensors"))

    def is_saved(self, folder: Path) -> bool:
        return (folder / "modules.json").exists()
