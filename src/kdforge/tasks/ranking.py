"""Task ``ranking``: a bi-encoder student learns a teacher's relevance scores.

Training examples are (query, positive, K negatives) from a BEIR folder's training
qrels. Negatives are mined with a bi-encoder (the teacher, or ``data.miner``): each
query's top documents that are not judged relevant. The teacher scores every
(query, candidate) pair; the student's scores are the similarities of its query and
document embeddings. Outputs:

- ``scores``: ``[B, 1+K]``, the positive in column 0, for ``margin_mse`` (Hofstätter
  et al. 2020) and ``listwise_kl``;
- ``embeddings``: the queries' then the documents' embeddings ``[B + B(1+K), D]``.

The teacher is any scorer: a sentence-transformers bi-encoder, a ``CrossEncoder``
(loaded as one when its folder holds a sequence-classification model), or a kdforge
cache of its scores. Each batch draws random queries and a random example of each
(:class:`~kdforge.data.tasb.RandomPairSampler`), unless the recipe lists the
``tasb_batches`` method (:mod:`kdforge.methods.tasb`): its batches follow TAS-B
(Hofstätter et al. 2021), each from one k-means cluster of the training queries (on the
miner's query embeddings), each query's example from margin-balanced bins of the
teacher's margins. The task offers the method its training pairs (capability
``has_pairs``): :attr:`RankingTask.triples` (each example's query and teacher margin)
and :meth:`RankingTask.query_clusters`.

The no-distillation baseline trains on the labels alone: InfoNCE over the same
candidates (``contrastive``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import CrossEncoder, SentenceTransformer
from torch import nn
from torch.utils.data import Dataset, Sampler

from kdforge.data.beir import load_beir, resolve_data_path
from kdforge.data.mining import mine_negatives
from kdforge.data.tasb import RandomPairSampler, cluster_queries
from kdforge.distributed import batch_items, batch_rows
from kdforge.errors import RecipeError
from kdforge.eval.retrieval import retrieval_metrics, search
from kdforge.models.refs import resolve_model_ref
from kdforge.models.sentence_encoder import run_encoder, uses_cosine
from kdforge.outputs import ModelOutputs
from kdforge.progress import counting_progress
from kdforge.recipe import ObjectiveTerm
from kdforge.signals import CacheTeacherConfig
from kdforge.tasks.base import TASKS, Evaluation, Splits
from kdforge.tasks.encoder_config import RankingData
from kdforge.tasks.encoders import EncoderTask, RetrievalSet, limit_collection, scoring_rows


@dataclass
class TrainingTriples:
    """The training examples: query, positive and K negatives (doc ids), with the teacher's margins."""

    queries: list[str]  # query texts, by query rank
    corpus: dict[str, str]
    query: np.ndarray  # [P] query rank of each example
    positive: list[str]  # [P] doc id
    negatives: list[list[str]]  # [P][K] doc ids
    margin: np.ndarray  # [P] t(q, pos) - mean_k t(q, neg_k)
    query_embeddings: np.ndarray  # [Q, D] the miner's embedding of each query (what TAS-B clusters)


class TripleDataset(Dataset):
    def __init__(self, triples: TrainingTriples):
        self.triples = triples

    def __len__(self) -> int:
        return len(self.triples.query)

    def __getitem__(self, index: int) -> tuple[str, list[str], list[str]]:
        t = self.triples
        docs = [t.positive[index], *t.negatives[index]]
        return t.queries[t.query[index]], [t.corpus[d] for d in docs], docs


def _is_cross_encoder(path: Path | None) -> bool:
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


@TASKS.register("ranking")
class RankingTask(EncoderTask):
    name = "ranking"
    capabilities = frozenset({"has_pairs"})
    data_schema = RankingData
    output_fields = ("scores", "embeddings")

    def __init__(self, recipe):
        super().__init__(recipe)
        if self.data_cfg.in_batch and isinstance(recipe.teacher, CacheTeacherConfig):
            raise RecipeError(
                "data.in_batch: a cache holds each example's own candidates, not the documents a batch happens to"
                " hold; use an online (or served) teacher, or set data.in_batch: false"
            )

    # ---- teacher -----------------------------------------------------------------------
    def load_teacher(self, ref: str, field: str = "teacher.model") -> nn.Module:
        location = resolve_model_ref(ref, field=field)
        if _is_cross_encoder(location.path):
            cached = self._teacher_cache.get(ref)
            if cached is None:
                cached = self._teacher_cache[ref] = CrossEncoder(
                    str(location.path), device="cpu", max_length=self.data_cfg.max_length
                )
            return cached
        return super().load_teacher(ref, field)

    def _miner(self) -> SentenceTransformer:
        ref = self.data_cfg.miner or self.teacher_ref()
        field = "data.miner" if self.data_cfg.miner else "teacher.model"
        if ref is None:
            raise RecipeError("data.miner: name a bi-encoder to mine negatives with (the teacher has no model)")
        model = self.load_teacher(ref, field)
        if not isinstance(model, SentenceTransformer):
            raise RecipeError(
                f"{field}: {ref} is a cross-encoder, which cannot search a corpus; set data.miner to a bi-encoder"
            )
        return model

    # ---- data --------------------------------------------------------------------------
    def query_max_length(self) -> int:
        return self.data_cfg.query_max_length

    def data_files(self) -> list[Path]:
        root = resolve_data_path(self.data_cfg.beir, "data.beir")
        return [root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / f"{self.data_cfg.train_split}.tsv"]

    @cached_property
    def triples(self) -> TrainingTriples:
        cfg = self.data_cfg
        data = limit_collection(
            load_beir(cfg.beir, cfg.train_split, field="data.beir"), cfg.query_limit, cfg.corpus_limit
        )
        query_ids = list(data.queries)
        doc_ids = list(data.corpus)
        position = {d: i for i, d in enumerate(doc_ids)}
        positives = [{position[d] for d, s in data.qrels[q].items() if s > 0 and d in position} for q in query_ids]
        keep = [i for i, p in enumerate(positives) if p]
        query_ids, positives = [query_ids[i] for i in keep], [positives[i] for i in keep]
        if not query_ids:
            raise RecipeError(f"data.beir: the {cfg.train_split} qrels judge no document relevant to any query")
        miner_ref = cfg.miner or self.teacher_ref()
        miner = self._miner()
        texts = [data.queries[q] for q in query_ids]
        q_emb = self.cached_encode(miner, miner_ref, texts, cfg.query_max_length, "training queries")
        d_emb = self.cached_encode(miner, miner_ref, [data.corpus[d] for d in doc_ids], cfg.max_length, "corpus")
        q_emb, d_emb = scoring_rows(miner, q_emb), scoring_rows(miner, d_emb)
        mined = mine_negatives(q_emb, d_emb, positives, cfg.negatives, skip_top=cfg.skip_top)

        per_chunk = cfg.negatives_per_example
        rows: list[tuple[int, int, list[int]]] = []
        for qi, (pos, negs) in enumerate(zip(positives, mined.tolist())):
            for p in sorted(pos):
                for start in range(0, cfg.negatives - per_chunk + 1, per_chunk):
                    rows.append((qi, p, negs[start : start + per_chunk]))
        scores = self._teacher_scores(texts, doc_ids, data.corpus, rows, q_emb, d_emb)
        margin = scores[:, 0] - scores[:, 1:].mean(1)
        return TrainingTriples(
            queries=texts,
            corpus=data.corpus,
            query=np.array([r[0] for r in rows], dtype=np.int64),
            positive=[doc_ids[r[1]] for r in rows],
            negatives=[[doc_ids[n] for n in r[2]] for r in rows],
            margin=margin,
            query_embeddings=q_emb,
        )

    def _teacher_scores(self, queries, doc_ids, corpus, rows, q_emb, d_emb) -> np.ndarray:
        """The teacher's scores [P, 1+K] of each example's positive and negatives (for the TAS-B margins)."""
        ref = self.teacher_ref()
        teacher = self.load_teacher(ref) if ref is not None else None
        if teacher is None or (isinstance(teacher, SentenceTransformer) and (self.data_cfg.miner in (None, ref))):
            # the miner is the teacher: its embeddings already give every score
            return np.stack([d_emb[[p, *negs]] @ q_emb[qi] for qi, p, negs in rows]).astype(np.float32)
        out = np.zeros((len(rows), 1 + self.data_cfg.negatives_per_example), dtype=np.float32)
        with counting_progress(transient=True) as progress:
            bar = progress.add_task("teacher scores", total=len(rows))
            for i, (qi, p, negs) in enumerate(rows):
                docs = [corpus[doc_ids[d]] for d in (p, *negs)]
                out[i] = self._score_pairs(teacher, queries[qi], docs)
                progress.advance(bar)
        return out

    @torch.no_grad()
    def _score_pairs(self, teacher: nn.Module, query: str, docs: list[str]) -> np.ndarray:
        if isinstance(teacher, CrossEncoder):
            return np.asarray(teacher.predict([(query, d) for d in docs], show_progress_bar=False), dtype=np.float32)
        q = self.encoder(teacher, self.data_cfg.query_max_length)([query])
        d = self.encoder(teacher, self.data_cfg.max_length)(docs)
        return d @ q[0]

    def splits(self) -> Splits:
        test = self.test_set()
        return Splits(TripleDataset(self.triples), test, test, "test")

    # ---- training pairs (capability has_pairs: the tasb_batches method composes batches of them) --------
    def query_clusters(self, clusters: int | None = None) -> np.ndarray:
        """[Q] k-means cluster of each training query (indexed as ``triples.query``), on the miner's query
        embeddings: ``clusters`` of them, by default Q / (2 * training.batch_size) (at least 1), seeded with
        training.seed; computed once per count."""
        t = self.triples
        count = clusters or max(1, len(t.queries) // (2 * self.recipe.training.batch_size))
        if count not in self._query_clusters:
            self._query_clusters[count] = cluster_queries(t.query_embeddings, count, seed=self.recipe.training.seed)
        return self._query_clusters[count]

    @cached_property
    def _query_clusters(self) -> dict[int, np.ndarray]:
        return {}

    def train_sampler(self, seed: int) -> Sampler[int] | None:
        """Random queries, a random example of each; the epoch as long as TAS-B's over the default clusters.
        (A method that composes the batches, tasb_batches, takes precedence in the runner.)"""
        t = self.triples
        return RandomPairSampler(t.query, t.margin, self.query_clusters(), self.recipe.training.batch_size, seed)

    def training_info(self, steps: int) -> dict[str, Any]:
        t = self.triples
        info: dict[str, Any] = {"training_examples": len(t.query), "training_queries": len(t.queries)}
        # what this order is; a method that composes the batches reports its own over these keys
        info.update(sampler="random", query_clusters=int(len(np.unique(self.query_clusters()))))
        return info

    def collate(self, items: list[tuple[str, list[str], list[str]]]) -> dict[str, Any]:
        queries = [q for q, _, _ in items]
        docs = [d for _, ds, _ in items for d in ds]
        q = self.tokens(queries, self.data_cfg.query_max_length)
        d = self.tokens(docs, self.data_cfg.max_length)
        batch: dict[str, Any] = {f"query_{k}": v for k, v in q.items()}
        batch.update({f"doc_{k}": v for k, v in d.items()})
        batch["labels"] = torch.zeros(len(items), dtype=torch.long)  # the positive is candidate 0
        batch["query_texts"], batch["doc_texts"] = queries, docs  # for scorers with their own tokenizer
        batch["candidate_ids"] = [d for _, _, ids in items for d in ids]  # for scorers that index the corpus (BM25)
        return batch

    # ---- outputs -----------------------------------------------------------------------
    def adapter(self, model: nn.Module, batch: dict[str, Any], fields: frozenset[str]) -> ModelOutputs:
        if isinstance(model, CrossEncoder):
            return self._cross_encoder_outputs(model, batch, fields)

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

    # ---- a cross-encoder teacher in the report ---------------------------------------------
    def evaluate(self, model: nn.Module, dataset: Dataset) -> Evaluation:
        """Bi-encoders search the corpus; a cross-encoder re-ranks the miner's top-k (it cannot search)."""
        if not isinstance(model, CrossEncoder):
            return super().evaluate(model, dataset)
        assert isinstance(dataset, RetrievalSet)
        data, k = dataset.data, self.data_cfg.test.k
        first = self._miner()
        query_ids, doc_ids = list(data.queries), list(data.corpus)
        q = self.encoder(first, self.data_cfg.query_max_length, "queries")([data.queries[i] for i in query_ids])
        d = self.encoder(first, self.data_cfg.max_length, "documents")([data.corpus[i] for i in doc_ids])
        _, indices = search(q, d, k)
        run = {}
        started = time.perf_counter()
        for row, qid in enumerate(query_ids):
            docs = [doc_ids[j] for j in indices[row] if j >= 0]
            pairs = [(data.queries[qid], data.corpus[doc]) for doc in docs]
            scores = model.predict(pairs, batch_size=self.recipe.evaluation.batch_size, show_progress_bar=False)
            run[qid] = {doc: float(score) for doc, score in zip(docs, scores)}
        metrics = retrieval_metrics(data.qrels, run, ("ndcg@10", f"recall@{k}", "mrr@10"))
        metrics["query_ms"] = (time.perf_counter() - started) * 1000 / max(len(query_ids), 1)
        return Evaluation(metrics=metrics)

    def forward_for_speed(self, model: nn.Module):
        if isinstance(model, CrossEncoder):  # one (query, document) pair per row: the documents' own tokens
            return lambda batch: model.model(**batch)
        return super().forward_for_speed(model)

    def baseline_objective(self) -> list[ObjectiveTerm]:
        return [ObjectiveTerm(loss="contrastive", field="scores", weight=1.0)]
