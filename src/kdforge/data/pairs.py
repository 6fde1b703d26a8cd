"""Retrieval training data from any table: (query, positive) pairs or (query, positive, negatives) triples.

The layouts sentence-transformers trains on: a ``query`` and a ``positive`` text per row
(its "anchor, positive" pairs), and optionally hard negatives, as one ``negative`` text
or a ``negatives`` list. They become one :class:`~kdforge.data.beir.BeirData` collection
(every distinct text a document, every distinct query a query, each row a judgement), so
the ranking tasks mine negatives and score margins over them as over a BEIR folder; the
file's own negatives come first in each query's negatives (:attr:`Pairs.negatives`).
"""

from __future__ import annotations

from dataclasses import dataclass

from kdforge.data.beir import BeirData
from kdforge.data.table import SourceFields, read_table

ROLES = {"query": True, "positive": True, "negative": False, "negatives": False}


@dataclass
class Pairs:
    collection: BeirData
    #: query id -> the doc ids the file gives as that query's negatives (hard negatives), in order
    negatives: dict[str, list[str]]
    skipped: int


def _negatives(value: object) -> list[str]:
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, list):
        return [v for v in value if isinstance(v, str) and v.strip()]
    return []


def read_pairs_table(fields: SourceFields) -> Pairs:
    """The file's rows of every split as one training collection (the evaluation has its own)."""
    table = read_table(fields, ROLES, texts=("query", "positive"))
    doc_ids: dict[str, str] = {}
    query_ids: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    negatives: dict[str, list[str]] = {}

    def doc(text: str) -> str:
        return doc_ids.setdefault(text, f"d{len(doc_ids)}")

    for values in table.splits.values():
        rows = len(values["query"])
        given = [
            _negatives(values.get("negative", [None] * rows)[i]) + _negatives(values.get("negatives", [None] * rows)[i])
            for i in range(rows)
        ]
        for query, positive, negs in zip(values["query"], values["positive"], given):
            qid = query_ids.setdefault(query, f"q{len(query_ids)}")
            qrels.setdefault(qid, {})[doc(positive)] = 1
            for text in negs:
                listed = negatives.setdefault(qid, [])
                if doc(text) not in listed:
                    listed.append(doc(text))
    corpus = {doc_id: text for text, doc_id in doc_ids.items()}
    queries = {qid: text for text, qid in query_ids.items()}
    for qid, listed in negatives.items():  # a text the file calls both positive and negative stays a positive
        negatives[qid] = [d for d in listed if qrels[qid].get(d, 0) <= 0]
    return Pairs(BeirData(corpus, queries, qrels), negatives, sum(table.skipped.values()))
