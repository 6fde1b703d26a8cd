"""Task ``vq_index``: Distill-VQ, an IVF-PQ index learned from a dense teacher's ranking.

Xiao et al. 2022 ("Distill-VQ: Learning Retrieval Oriented Vector Quantization by
Distilling Knowledge from Dense Embeddings"). The teacher is a bi-encoder; its
embeddings of the collection and of the training queries are the fixed inputs
(computed once and kept in kdforge's embedding cache, ``KDFORGE_CACHE_DIR/embeddings``,
so later runs read them back). The student is the index itself
(:class:`kdforge.models.ivfpq.IVFPQStudent`): IVF centroids and PQ codebooks, started
from faiss's IVF-PQ trained for reconstruction and then trained so that scores through
the quantised documents rank like the teacher's. No labels are used.

A batch is B training queries and the union of their teacher top-K documents; every
query is scored against every document of the batch (its own candidates and the other
queries': Distill-VQ's "in-batch + top-K" setting). Outputs, both ``[B, U]``:

- ``scores``: ``<q, o_c(d) + u_hat_d>`` for the student (hard PQ in the forward pass,
  straight-through soft assignment for the gradient), ``<q, d>`` for the teacher;
- ``ivf_scores``: ``<q, o_c(d)>`` for the student (the coarse score Distill-VQ trains with
  its own term); for the teacher the same ``<q, d>`` (its ranking is the target of both).

Train with ``listnet`` on both fields. The no-distillation baseline is the student as
initialised: faiss's own IVF-PQ, same code size and nprobe. The saved student is a
faiss index (``faiss.read_index(folder/index.faiss)``) plus its state for resuming.
Evaluation searches the test queries' teacher embeddings: nDCG@10, Recall@k, MRR@10,
the index's bytes (and per document), its build time and the search latency of one
query (the teacher encodes queries for every row alike; that time is not counted).
"""

from __future__ import annotations

import json
import shutil
import time
from functools import cached_property
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from torch import nn
from torch.utils.data import Dataset

from kdforge.data.beir import load_beir
from kdforge.distributed import batch_rows, current_share
from kdforge.errors import RecipeError
from kdforge.eval.retrieval import flat_ip_index, retrieval_metrics, search, serving_latency
from kdforge.models.ivfpq import IVFPQSpec, IVFPQStudent, build_faiss_index, index_bytes
from kdforge.models.store import replace_folder
from kdforge.outputs import ModelOutputs
from kdforge.provenance import Paper
from kdforge.signals import CacheTeacherConfig, OnlineTeacherConfig
from kdforge.tasks.base import TASKS, Evaluation, Splits
from kdforge.tasks.encoder_config import VQData, VQStudent
from kdforge.tasks.encoders import EncoderTask, RetrievalSet, limit_collection, scoring_rows

INDEX_FILE = "index.faiss"


class QueryRows(Dataset):
    """Training queries by row; the collate looks up their embeddings and candidates."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> int:
        return index


@TASKS.register("vq_index")
class VQIndexTask(EncoderTask):
    name = "vq_index"
    paper = Paper(
        "Distill-VQ: Learning Retrieval Oriented Vector Quantization By Distilling Knowledge from Dense Embeddings",
        2022,
        "2204.00185",
        authors="Xiao and others",
    )
    student_schema = VQStudent
    data_schema = VQData
    output_fields = ("scores", "ivf_scores")
    throughput_unit = "queries/s"
    card_library = "faiss"
    load_hint = (
        "import faiss\nindex = faiss.read_index({folder!r} + '/index.faiss')\n"
        "scores, rows = index.search(query_embeddings, 10)  # rows of doc_ids.json"
    )

    def __init__(self, recipe):
        super().__init__(recipe)
        if not isinstance(recipe.teacher, (OnlineTeacherConfig, CacheTeacherConfig)) or not recipe.teacher.model:
            raise RecipeError(
                "teacher.model: Distill-VQ learns an index over a bi-encoder's embeddings; name that bi-encoder"
            )
        if isinstance(recipe.teacher, CacheTeacherConfig):
            raise RecipeError(
                "teacher.signal: the teacher's embeddings are computed once and kept in kdforge's embedding"
                " cache by themselves; use an online teacher (signal: online)"
            )

    # ---- the teacher's embeddings: the fixed inputs ---------------------------------------
    def _teacher(self) -> SentenceTransformer:
        teacher = self.load_teacher(self.teacher_ref())
        if not isinstance(teacher, SentenceTransformer):
            raise RecipeError("teacher.model: Distill-VQ needs a bi-encoder teacher")
        return teacher

    def _embed(self, texts: list[str], max_length: int, what: str) -> np.ndarray:
        teacher = self._teacher()
        emb = self.cached_encode(teacher, self.teacher_ref(), texts, max_length, what, field="teacher.model")
        return scoring_rows(teacher, emb).astype(np.float32)

    @cached_property
    def collection(self) -> RetrievalSet:
        return self.test_set()

    @cached_property
    def doc_emb(self) -> np.ndarray:
        """[N, D] the teacher's rows of the collection the index holds (the test collection)."""
        data = self.collection.data
        return self._embed([data.corpus[d] for d in self.collection.doc_ids], self.data_cfg.max_length, "collection")

    @cached_property
    def test_query_emb(self) -> np.ndarray:
        data = self.collection.data
        return self._embed(list(data.queries.values()), self.data_cfg.query_max_length, "test queries")

    @cached_property
    def train_queries(self) -> tuple[np.ndarray, np.ndarray]:
        """The training queries' rows [Q, D] and each one's teacher top-K collection rows [Q, K]."""
        cfg = self.data_cfg
        data = limit_collection(load_beir(cfg.beir, cfg.train_split, field="data.beir"), cfg.query_limit, None)
        texts = [data.queries[q] for q in data.qrels]
        if not texts and not cfg.document_queries:
            raise RecipeError(f"data.beir: the {cfg.train_split} split has no queries to train on")
        rows = [self._embed(texts, cfg.query_max_length, "training queries")] if texts else []
        if cfg.document_queries:
            pick = np.random.default_rng(self.recipe.training.seed).permutation(len(self.doc_emb))
            rows.append(self.doc_emb[np.sort(pick[: cfg.document_queries])])
        queries = np.concatenate(rows)
        _, top = search(queries, self.doc_emb, min(cfg.top_k, len(self.doc_emb)))
        return queries, top

    def splits(self) -> Splits:
        queries, _ = self.train_queries
        return Splits(QueryRows(len(queries)), self.collection, self.collection, "test")

    def collate(self, items: list[int]) -> dict[str, Any]:
        queries, top = self.train_queries
        rows = np.asarray(items)
        docs = np.unique(top[rows].ravel())
        docs = docs[docs >= 0]
        return {
            "query_emb": torch.from_numpy(queries[rows]),
            "doc_emb": torch.from_numpy(self.doc_emb[docs]),
            "doc_index": torch.from_numpy(docs.astype(np.int64)),
        }

    def training_info(self, steps: int) -> dict[str, Any]:
        queries, top = self.train_queries
        return {"training_queries": len(queries), "candidates_per_query": int(top.shape[1])}

    # ---- the student: the index ---------------------------------------------------------
    def spec(self) -> IVFPQSpec:
        cfg = self.student_cfg
        try:
            return IVFPQSpec(dim=self.doc_emb.shape[1], nlist=cfg.nlist, m=cfg.m, nbits=cfg.nbits, opq=cfg.opq)
        except ValueError as exc:
            raise RecipeError(f"student: {exc}") from None

    def build_student(self) -> nn.Module:
        spec, seed = self.spec(), self.recipe.training.seed
        try:
            if self.student_cfg.init == "random":
                student = IVFPQStudent.from_random(spec, self.doc_emb, seed)
            else:
                student = IVFPQStudent.from_faiss(build_faiss_index(spec, self.doc_emb, seed), self.doc_emb)
        except ValueError as exc:
            raise RecipeError(f"student: {exc}") from None
        student.ivf_lr_scale = self.student_cfg.ivf_lr_scale
        return student.train()

    def adapter(self, model: nn.Module, batch: dict[str, Any], fields: frozenset[str]) -> ModelOutputs:
        doc_emb, doc_index = self._batch_documents(batch)
        if isinstance(model, IVFPQStudent):
            out = model(batch["query_emb"], doc_emb, doc_index)
            return ModelOutputs(**{name: out[name] for name in fields})
        # the teacher: its own embeddings (the batch's inputs) scored exactly, the target of both fields
        exact = batch["query_emb"] @ doc_emb.T
        return ModelOutputs(**{name: exact for name in fields})

    def _batch_documents(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """The documents every query is scored against: the union of the batch's top-K lists; on
        several processes, the union over the whole global batch, as one process would score."""
        if current_share() is None:
            return batch["doc_emb"], batch["doc_index"]
        every, _ = batch_rows(batch["doc_index"])
        docs = torch.unique(every)  # sorted, as the collate's np.unique
        return torch.from_numpy(self.doc_emb[docs.cpu().numpy()]).to(batch["doc_emb"].device), docs

    def baseline_objective(self) -> None:
        """No labels: the baseline is the index as initialised, faiss's IVF-PQ trained for reconstruction."""
        return None

    # ---- searching -----------------------------------------------------------------------
    def searchable(self, model: nn.Module) -> tuple[faiss.Index, float]:
        """The faiss index a model searches with (and the seconds it took to build)."""
        started = time.perf_counter()
        if isinstance(model, IVFPQStudent):
            index = model.to_faiss(self.doc_emb)
            faiss.extract_index_ivf(index).nprobe = min(self.student_cfg.nprobe, self.student_cfg.nlist)
        else:
            index = flat_ip_index(self.doc_emb)
        return index, time.perf_counter() - started

    def evaluate(self, model: nn.Module, dataset: Dataset) -> Evaluation:
        assert isinstance(dataset, RetrievalSet)
        if not isinstance(model, IVFPQStudent) and model is not self._teacher():
            raise RecipeError("vq_index evaluates the teacher and learned indexes only")
        k = min(self.data_cfg.test.k, len(self.doc_emb))
        index, build_seconds = self.searchable(model)
        data, doc_ids = dataset.data, dataset.doc_ids
        scores, rows = index.search(self.test_query_emb, k)
        run = {
            qid: {doc_ids[j]: float(s) for j, s in zip(rows[i], scores[i]) if j >= 0}
            for i, qid in enumerate(data.queries)
        }
        metrics = retrieval_metrics(data.qrels, run, ("ndcg@10", f"recall@{self.data_cfg.test.k}", "mrr@10"))
        size = index_bytes(index)
        # per document in the inverted lists: its code and its 8-byte id (a flat index: the float32 vector)
        code = faiss.extract_index_ivf(index).code_size + 8 if isinstance(model, IVFPQStudent) else index.d * 4
        latency_rows = self.test_query_emb[: self.data_cfg.test.latency_queries]
        metrics.update(
            query_ms=serving_latency(lambda i: index.search(latency_rows[i : i + 1], k), range(len(latency_rows))),
            index_bytes=float(size),
            bytes_per_doc=size / len(self.doc_emb),
            code_bytes_per_doc=float(code),
            index_build_s=build_seconds,
        )
        return Evaluation(metrics=metrics)

    # ---- speed ---------------------------------------------------------------------------
    def throughput_batch(self, dataset: Dataset, batch_size: int) -> dict[str, Any]:
        rows = np.arange(batch_size) % len(self.test_query_emb)
        return {"query_emb": self.test_query_emb[rows]}

    def throughput_items(self, batch: dict[str, Any]) -> int:
        return len(batch["query_emb"])

    def forward_for_speed(self, model: nn.Module):
        """Queries searched per second (top-k), batched."""
        index, _ = self.searchable(model)
        k = min(self.data_cfg.test.k, len(self.doc_emb))
        return lambda batch: index.search(batch["query_emb"], k)

    # ---- saving --------------------------------------------------------------------------
    def save_model(self, model: nn.Module, folder: Path, card: str) -> Path:
        """``index.faiss`` (search with it), ``doc_ids.json`` (its rows), the state and ``config.json``
        (for ``--resume``); written aside and moved into place."""
        assert isinstance(model, IVFPQStudent)
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        index, _ = self.searchable(model)
        faiss.write_index(index, str(tmp / INDEX_FILE))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        config = {"architecture": "ivfpq", **model.config(), "nprobe": self.student_cfg.nprobe}
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "doc_ids.json").write_text(json.dumps(self.collection.doc_ids))
        (tmp / "README.md").write_text(card)
        replace_folder(tmp, folder)
        return folder

    def load_saved(self, folder: Path) -> nn.Module:
        config = json.loads((folder / "config.json").read_text())
        return IVFPQStudent.from_state(config, load_file(str(folder / "model.safetensors")))

    def saved_weight_files(self, folder: Path) -> list[Path]:
        return [folder / INDEX_FILE]
