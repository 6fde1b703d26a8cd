"""Data sources of the text-encoder tasks (each a :class:`~kdforge.tasks.parts.DataSource`).

- :class:`UnlabeledTexts` (``embedding``): a BEIR folder's documents and training queries,
  or a text file; a batch is B tokenized texts.
- :class:`QueryCandidates` (``vq_index``): training queries and each one's teacher top-K
  documents, as the teacher's embeddings; a batch is B queries and the union of their candidates.
- :class:`RankingPairs` (``ranking``, ``sparse_retriever``): (query, positive, K negatives)
  from a BEIR folder's training qrels, negatives mined with a bi-encoder and each example's
  teacher margin; a batch is B queries and their B(1+K) documents. It offers the
  ``has_pairs`` capability's :attr:`~RankingPairs.triples` and :meth:`~RankingPairs.query_clusters`.

The text sources read texts through a sentence-encoder family's tokenizer and take the
test split from the retrieval evaluator (``test``), so the same held-out collection is
evaluated on during and after training.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from torch.utils.data import Dataset, Sampler, Subset

from kdforge.data.beir import BeirData, load_beir, resolve_data_path
from kdforge.data.mining import mine_negatives
from kdforge.data.pairs import Pairs, read_pairs_table
from kdforge.data.table import LazyTexts, read_table
from kdforge.data.table import data_files as table_files
from kdforge.data.tasb import RandomPairSampler, cluster_queries
from kdforge.errors import DataError, RecipeError
from kdforge.eval.retrieval import search
from kdforge.objective import FIELD_MASKS
from kdforge.progress import counting_progress
from kdforge.recipe import Recipe
from kdforge.tasks.base import Splits
from kdforge.tasks.encoder_config import EmbeddingData, RankingData, VQData
from kdforge.tasks.encoders import SentenceEncoderFamily, field_masks, scoring_rows
from kdforge.tasks.retrieval import RetrievalSet, limit_collection

if TYPE_CHECKING:
    from kdforge.tasks.ivfpq_family import IVFPQFamily


def beir_files(beir: str, split: str, field: str = "data.beir") -> list[Path]:
    """The files of a BEIR folder one split reads: corpus, queries and that split's qrels."""
    root = resolve_data_path(beir, field)
    return [root / "corpus.jsonl", root / "queries.jsonl", root / "qrels" / f"{split}.tsv"]


# ---- unlabeled texts ------------------------------------------------------------------------------


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


class UnlabeledTexts:
    """Texts to distill on (``data.beir``'s documents and training queries, or ``data.text_file``).

    A batch is the texts' tokens with ``token_mask`` (real tokens), the default mask of the
    token-level fields."""

    def __init__(self, cfg: EmbeddingData, encoders: SentenceEncoderFamily, test: Callable[[], RetrievalSet]):
        self.cfg, self.encoders, self.test = cfg, encoders, test

    def train_texts(self) -> list[str]:
        cfg = self.cfg
        if cfg.source is not None or cfg.files is not None:
            table = read_table(cfg, {"text": True}, texts=("text",))
            texts = [t for split in table.splits.values() for t in split["text"]]
        elif cfg.text_file is not None:
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
        test = self.test()
        if self.cfg.streaming:  # each text read from the memory-mapped table when its batch is made
            texts = LazyTexts(self.cfg, "text")
            limit = min(len(texts), self.cfg.train_limit or len(texts))
            return Splits(Subset(texts, range(limit)), test, test, "test")  # type: ignore[arg-type]
        return Splits(TextDataset(self.train_texts()), test, test, "test")

    def data_files(self) -> list[Path]:
        cfg = self.cfg
        if cfg.source is not None or cfg.files is not None:
            return table_files(cfg)
        if cfg.text_file is not None:
            return [resolve_data_path(cfg.text_file, "data.text_file")]
        return beir_files(cfg.beir, cfg.train_split)

    def collate(self, items: list[str]) -> dict[str, Any]:
        batch: dict[str, Any] = self.encoders.tokens(list(items), self.cfg.max_length)
        batch["token_mask"] = batch["attention_mask"].bool()
        batch[FIELD_MASKS] = field_masks()
        return batch

    def train_sampler(self, seed: int) -> Sampler[int] | None:
        return None

    def training_info(self, steps: int) -> dict[str, Any]:
        return {}


# ---- ranking pairs --------------------------------------------------------------------------------


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


class RankingPairs:
    """(query, positive, K negatives) mined from ``data.beir``'s training qrels (see the module).

    ``encoders`` mines (its miner: ``data.miner`` or the teacher), scores the margins (its teacher) and
    tokenizes. Batches are random queries, a random example of each (``RandomPairSampler``), unless a
    method composes them from :attr:`triples` and :meth:`query_clusters` (``tasb_batches``).
    """

    def __init__(
        self, recipe: Recipe, cfg: RankingData, encoders: SentenceEncoderFamily, test: Callable[[], RetrievalSet]
    ):
        self.recipe, self.cfg, self.encoders, self.test = recipe, cfg, encoders, test
        self._query_clusters: dict[int, np.ndarray] = {}

    @property
    def from_table(self) -> bool:
        return self.cfg.source is not None or self.cfg.files is not None

    @cached_property
    def _pairs(self) -> Pairs:
        return read_pairs_table(self.cfg)

    @cached_property
    def train_collection(self) -> BeirData:
        """The whole training collection (``data.beir``'s ``train_split``, or the table's pairs), not limited."""
        if self.from_table:
            return self._pairs.collection
        return load_beir(self.cfg.beir, self.cfg.train_split, field="data.beir")

    def data_files(self) -> list[Path]:
        if self.from_table:
            return table_files(self.cfg)
        return beir_files(self.cfg.beir, self.cfg.train_split)

    @cached_property
    def triples(self) -> TrainingTriples:
        cfg, encoders = self.cfg, self.encoders
        data = limit_collection(self.train_collection, cfg.query_limit, cfg.corpus_limit)
        query_ids = list(data.queries)
        doc_ids = list(data.corpus)
        position = {d: i for i, d in enumerate(doc_ids)}
        positives = [{position[d] for d, s in data.qrels[q].items() if s > 0 and d in position} for q in query_ids]
        keep = [i for i, p in enumerate(positives) if p]
        query_ids, positives = [query_ids[i] for i in keep], [positives[i] for i in keep]
        if not query_ids:
            where = "data.files" if self.from_table else f"data.beir: the {cfg.train_split} qrels"
            raise RecipeError(f"{where}: judge no document relevant to any query")
        miner_ref = cfg.miner or encoders.teacher_ref
        miner = encoders.miner()
        texts = [data.queries[q] for q in query_ids]
        q_emb = encoders.cached_encode(miner, miner_ref, texts, cfg.query_max_length, "training queries")
        d_emb = encoders.cached_encode(miner, miner_ref, [data.corpus[d] for d in doc_ids], cfg.max_length, "corpus")
        q_emb, d_emb = scoring_rows(miner, q_emb), scoring_rows(miner, d_emb)
        mined = mine_negatives(q_emb, d_emb, positives, cfg.negatives, skip_top=cfg.skip_top)
        if self.from_table:  # the file's own hard negatives first, then the mined ones
            given = self._pairs.negatives
            for qi, q in enumerate(query_ids):
                first = [position[d] for d in given.get(q, []) if d in position]
                if first:
                    rest = [n for n in mined[qi].tolist() if n not in first]
                    mined[qi] = (first + rest)[: cfg.negatives]

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
        ref = self.encoders.teacher_ref
        teacher = self.encoders.load_teacher(ref) if ref is not None else None
        if teacher is None or (isinstance(teacher, SentenceTransformer) and (self.cfg.miner in (None, ref))):
            # the miner is the teacher: its embeddings already give every score
            return np.stack([d_emb[[p, *negs]] @ q_emb[qi] for qi, p, negs in rows]).astype(np.float32)
        out = np.zeros((len(rows), 1 + self.cfg.negatives_per_example), dtype=np.float32)
        with counting_progress(transient=True) as progress:
            bar = progress.add_task("teacher scores", total=len(rows))
            for i, (qi, p, negs) in enumerate(rows):
                docs = [corpus[doc_ids[d]] for d in (p, *negs)]
                out[i] = self.encoders.score_pairs(teacher, queries[qi], docs)
                progress.advance(bar)
        return out

    def splits(self) -> Splits:
        test = self.test()
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
        q = self.encoders.tokens(queries, self.cfg.query_max_length)
        d = self.encoders.tokens(docs, self.cfg.max_length)
        batch: dict[str, Any] = {f"query_{k}": v for k, v in q.items()}
        batch.update({f"doc_{k}": v for k, v in d.items()})
        batch["labels"] = torch.zeros(len(items), dtype=torch.long)  # the positive is candidate 0
        batch["query_texts"], batch["doc_texts"] = queries, docs  # for scorers with their own tokenizer
        batch["candidate_ids"] = [d for _, _, ids in items for d in ids]  # for scorers that index the corpus (BM25)
        return batch


# ---- query candidates (Distill-VQ) ----------------------------------------------------------------


class QueryRows(Dataset):
    """Training queries by row; the collate looks up their embeddings and candidates."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> int:
        return index


class QueryCandidates:
    """Training queries (their texts only, no judgements) and each one's teacher top-K of the collection.

    ``index`` (an IVF-PQ family) gives the teacher's rows: ``embed(texts, ...)``, ``doc_emb`` and the
    ``collection`` the index holds, which is also the evaluation split. A batch is B queries' rows
    ``query_emb``, the union of their candidates' rows ``doc_emb`` and those rows' numbers ``doc_index``.
    """

    def __init__(self, recipe: Recipe, cfg: VQData, index: IVFPQFamily):
        self.recipe, self.cfg, self.index = recipe, cfg, index

    @cached_property
    def train_queries(self) -> tuple[np.ndarray, np.ndarray]:
        """The training queries' rows [Q, D] and each one's teacher top-K collection rows [Q, K]."""
        cfg, doc_emb = self.cfg, self.index.doc_emb
        data = limit_collection(load_beir(cfg.beir, cfg.train_split, field="data.beir"), cfg.query_limit, None)
        texts = [data.queries[q] for q in data.qrels]
        if not texts and not cfg.document_queries:
            raise RecipeError(f"data.beir: the {cfg.train_split} split has no queries to train on")
        rows = [self.index.embed(texts, cfg.query_max_length, "training queries")] if texts else []
        if cfg.document_queries:
            pick = np.random.default_rng(self.recipe.training.seed).permutation(len(doc_emb))
            rows.append(doc_emb[np.sort(pick[: cfg.document_queries])])
        queries = np.concatenate(rows)
        _, top = search(queries, doc_emb, min(cfg.top_k, len(doc_emb)))
        return queries, top

    def splits(self) -> Splits:
        queries, _ = self.train_queries
        return Splits(QueryRows(len(queries)), self.index.collection, self.index.collection, "test")

    def collate(self, items: list[int]) -> dict[str, Any]:
        queries, top = self.train_queries
        rows = np.asarray(items)
        docs = np.unique(top[rows].ravel())
        docs = docs[docs >= 0]
        return {
            "query_emb": torch.from_numpy(queries[rows]),
            "doc_emb": torch.from_numpy(self.index.doc_emb[docs]),
            "doc_index": torch.from_numpy(docs.astype(np.int64)),
        }

    def data_files(self) -> list[Path]:
        return []

    def train_sampler(self, seed: int) -> Sampler[int] | None:
        return None

    def training_info(self, steps: int) -> dict[str, Any]:
        queries, top = self.train_queries
        return {"training_queries": len(queries), "candidates_per_query": int(top.shape[1])}
