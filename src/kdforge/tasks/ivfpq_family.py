"""The IVF-PQ index model family (Distill-VQ): the student is an index over a bi-encoder teacher's embeddings.

The teacher is a sentence-transformers bi-encoder, loaded and run by a
:class:`~kdforge.tasks.encoders.SentenceEncoderFamily` this family holds as ``encoders``;
its embeddings of the collection (the test collection, which the index holds) and of
the queries are the fixed inputs, computed once and kept in kdforge's embedding cache.
The student (:class:`kdforge.models.ivfpq.IVFPQStudent`) holds IVF centroids and PQ
codebooks, started from faiss's IVF-PQ trained for reconstruction (or at random); it is
saved as a faiss index plus its state for resuming.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
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

from kdforge.data.beir import BeirData
from kdforge.distributed import batch_rows, current_share
from kdforge.errors import RecipeError
from kdforge.eval.retrieval import flat_ip_index, serving_latency
from kdforge.models.ivfpq import IVFPQSpec, IVFPQStudent, build_faiss_index, index_bytes
from kdforge.models.store import replace_folder
from kdforge.outputs import ModelOutputs
from kdforge.recipe import Recipe
from kdforge.tasks.encoder_config import RetrievalTest, VQData, VQStudent
from kdforge.tasks.encoders import SentenceEncoderFamily, recipe_teacher_ref, scoring_rows
from kdforge.tasks.retrieval import RetrievalSet, Searched

INDEX_FILE = "index.faiss"


class IVFPQFamily:
    """Model family: a learned IVF-PQ index (student) over a bi-encoder teacher's embeddings (see the module).

    ``collection`` gives the collection the index holds (the retrieval evaluator's test set). The batch
    holds embeddings: ``query_emb`` ``[B, D]``, ``doc_emb`` ``[U, D]`` and their rows ``doc_index``.
    Outputs, both ``[B, U]``: ``scores`` (the student's through its quantised documents, the teacher's
    exact) and ``ivf_scores`` (the student's coarse scores; the teacher's exact ones again).
    """

    throughput_unit = "queries/s"
    card_library = "faiss"
    load_hint = (
        "import faiss\nindex = faiss.read_index({folder!r} + '/index.faiss')\n"
        "scores, rows = index.search(query_embeddings, 10)  # rows of doc_ids.json"
    )

    def __init__(
        self, recipe: Recipe, student_cfg: VQStudent, data_cfg: VQData, collection: Callable[[], RetrievalSet]
    ):
        self.recipe, self.student_cfg, self.data_cfg = recipe, student_cfg, data_cfg
        self._collection = collection
        self.encoders = SentenceEncoderFamily(
            recipe, student_cfg, data_cfg, layout="texts", teacher_ref=recipe_teacher_ref(recipe)
        )

    # ---- the teacher and its embeddings: the fixed inputs -----------------------------------
    def load_teacher(self, ref: str, field: str = "teacher.model") -> nn.Module:
        return self.encoders.load_teacher(ref, field)

    def teacher(self) -> SentenceTransformer:
        teacher = self.load_teacher(self.encoders.teacher_ref)
        if not isinstance(teacher, SentenceTransformer):
            raise RecipeError("teacher.model: Distill-VQ needs a bi-encoder teacher")
        return teacher

    def embed(self, texts: list[str], max_length: int, what: str) -> np.ndarray:
        """The teacher's scoring rows of ``texts`` (kept in the embedding cache)."""
        teacher = self.teacher()
        emb = self.encoders.cached_encode(
            teacher, self.encoders.teacher_ref, texts, max_length, what, field="teacher.model"
        )
        return scoring_rows(teacher, emb).astype(np.float32)

    @cached_property
    def collection(self) -> RetrievalSet:
        return self._collection()

    @cached_property
    def doc_emb(self) -> np.ndarray:
        """[N, D] the teacher's rows of the collection the index holds (the test collection)."""
        data = self.collection.data
        return self.embed([data.corpus[d] for d in self.collection.doc_ids], self.data_cfg.max_length, "collection")

    @cached_property
    def test_query_emb(self) -> np.ndarray:
        data = self.collection.data
        return self.embed(list(data.queries.values()), self.data_cfg.query_max_length, "test queries")

    def teacher_weight_files(self, ref: str, field: str = "teacher.model") -> list[Path]:
        return self.encoders.teacher_weight_files(ref, field)

    def tokenizer_files(self) -> list[Path]:
        return self.encoders.tokenizer_files()

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

    # ---- searching (the retrieval evaluator's hook) -------------------------------------------
    def searchable(self, model: nn.Module) -> tuple[faiss.Index, float]:
        """The faiss index a model searches with (and the seconds it took to build)."""
        started = time.perf_counter()
        if isinstance(model, IVFPQStudent):
            index = model.to_faiss(self.doc_emb)
            faiss.extract_index_ivf(index).nprobe = min(self.student_cfg.nprobe, self.student_cfg.nlist)
        else:
            index = flat_ip_index(self.doc_emb)
        return index, time.perf_counter() - started

    def search(self, model: nn.Module, data: BeirData, test: RetrievalTest) -> Searched:
        """The test queries' teacher rows searched in the model's index (the teacher's: exact, flat)."""
        if not isinstance(model, IVFPQStudent) and model is not self.teacher():
            raise RecipeError("vq_index evaluates the teacher and learned indexes only")
        k = min(test.k, len(self.doc_emb))
        index, build_seconds = self.searchable(model)
        doc_ids = self.collection.doc_ids
        scores, rows = index.search(self.test_query_emb, k)
        run = {
            qid: {doc_ids[j]: float(s) for j, s in zip(rows[i], scores[i]) if j >= 0}
            for i, qid in enumerate(data.queries)
        }
        size = index_bytes(index)
        # per document in the inverted lists: its code and its 8-byte id (a flat index: the float32 vector)
        code = faiss.extract_index_ivf(index).code_size + 8 if isinstance(model, IVFPQStudent) else index.d * 4
        latency_rows = self.test_query_emb[: test.latency_queries]

        def serve(i: int) -> None:
            index.search(latency_rows[i : i + 1], k)

        stats = {
            "index_bytes": float(size),
            "bytes_per_doc": size / len(self.doc_emb),
            "code_bytes_per_doc": float(code),
            "index_build_s": build_seconds,
        }
        return Searched(run, lambda: serving_latency(serve, range(len(latency_rows))), stats)

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

    def is_saved(self, folder: Path) -> bool:
        return (folder / "config.json").exists()

    def saved_weight_files(self, folder: Path) -> list[Path]:
        return [folder / INDEX_FILE]
