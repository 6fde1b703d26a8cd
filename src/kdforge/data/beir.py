"""Retrieval data: BEIR folders (corpus, queries, qrels) and WikiQA answer-sentence selection.

Both readers end in the same form, :class:`BeirData`, which the retrieval evaluation
(:mod:`kdforge.eval.retrieval`) reads:

- :func:`load_beir`: a BEIR folder (``corpus.jsonl``, ``queries.jsonl``,
  ``qrels/{split}.tsv``); a query is ranked against the whole corpus.
- :func:`load_wikiqa` reads WikiQA's question/sentence/label TSV into
  :class:`WikiQAQuestion` groups; :func:`wikiqa_to_beir` turns them into
  :class:`BeirData` whose ``pools`` restrict each question to its own candidates.

Recipes give dataset paths that may be relative to ``KDFORGE_DATA_DIR``;
:func:`resolve_data_path` finds them. Every problem with the data raises
:class:`~kdforge.errors.DataError` whose message starts with the recipe field, names the
file (and line) and says what to fix.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

from kdforge.data.paths import resolve_data_path
from kdforge.errors import DataError


@dataclass
class BeirData:
    """One split of a retrieval dataset, keyed by the dataset's own string ids.

    - ``corpus``: doc id -> text, title and body joined as BEIR and sentence-transformers
      do (``(title + " " + text).strip()``); in file order, which the evaluation keeps as
      the row order of the document embeddings.
    - ``queries``: query id -> text, only the queries that have qrels in the split.
    - ``qrels``: query id -> {doc id -> graded relevance}; scores <= 0 mean "judged not
      relevant" and the metrics ignore them.
    - ``pools``: query id -> the doc ids it is ranked against (WikiQA: its own candidate
      sentences); ``None`` ranks every query against the whole corpus.
    """

    corpus: dict[str, str]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    pools: dict[str, list[str]] | None = None


@dataclass
class WikiQAQuestion:
    """A WikiQA question with its candidate sentences (in file order) and their 0/1 labels."""

    question: str
    candidates: list[str] = dataclass_field(default_factory=list)
    labels: list[int] = dataclass_field(default_factory=list)  # 1: the sentence answers the question

    @property
    def has_answer(self) -> bool:
        return any(self.labels)


def _lines(file: Path, field: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline) for each non-blank line of a UTF-8 file."""
    try:
        # bytes line by line: BEIR corpora run to gigabytes (MS MARCO), and decoding each line
        # alone puts a bad byte on its own line number (a text stream decodes whole chunks)
        with file.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{field}: {file}:{number} is not UTF-8 text ({exc.reason})") from None
                if number == 1:
                    line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
                if line.strip():  # blank lines (a trailing newline) are not records
                    yield number, line
    except OSError as exc:
        raise DataError(f"{field}: cannot read {file} ({exc.strerror})") from None


def _need_file(file: Path, field: str, what: str) -> Path:
    if not file.is_file():
        raise DataError(f"{field}: {file} does not exist; a BEIR folder holds {what}")
    return file


def _read_jsonl(file: Path, field: str, *, with_title: bool) -> dict[str, str]:
    """id -> text from BEIR JSON lines (``_id``, ``text``, and for a corpus an optional ``title``)."""
    texts: dict[str, str] = {}
    for number, line in _lines(file, field):
        where = f"{file}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{field}: {where} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{field}: {where} is a JSON {type(record).__name__}, not an object")
        key = record.get("_id")
        # ids are strings in BEIR; some exports write numbers, which mean the same id
        if isinstance(key, bool) or not isinstance(key, str | int):
            raise DataError(f"{field}: {where} has no string '_id' (it has {', '.join(map(repr, record))})")
        text = record.get("text")
        if not isinstance(text, str):
            raise DataError(f"{field}: {where} has no string 'text' (it has {', '.join(map(repr, record))})")
        if with_title:
            title = record.get("title") or ""  # BEIR treats a missing or null title as empty
            if not isinstance(title, str):
                raise DataError(f"{field}: {where}: 'title' is a {type(title).__name__}, not a string")
            text = (title + " " + text).strip()
        key = str(key)
        if key in texts:
            raise DataError(f"{field}: {where} repeats the id {key!r}; ids must be unique")
        texts[key] = text
    if not texts:
        raise DataError(f"{field}: {file} holds no JSON lines")
    return texts


def _read_qrels(file: Path, field: str) -> dict[str, dict[str, int]]:
    """BEIR qrels: tab-separated ``query-id corpus-id score`` with that header line."""
    qrels: dict[str, dict[str, int]] = {}
    for number, line in _lines(file, field):
        columns = line.split("\t")
        if number == 1 and columns[0].strip().lower() == "query-id":
            continue
        where = f"{file}:{number}"
        if len(columns) != 3:
            raise DataError(
                f"{field}: {where} has {len(columns)} tab-separated columns; BEIR qrels have 3"
                " (query-id, corpus-id, score)"
            )
        query_id, doc_id, score_text = (c.strip() for c in columns)
        try:
            score = int(score_text)
        except ValueError:
            raise DataError(f"{field}: {where}: score {score_text!r} is not an integer") from None
        docs = qrels.setdefault(query_id, {})
        if docs.get(doc_id, score) != score:
            raise DataError(f"{field}: {where} judges ({query_id}, {doc_id}) again with another score")
        docs[doc_id] = score
    if not qrels:
        raise DataError(f"{field}: {file} holds no judgements")
    return qrels


def check_beir_files(folder: str | Path, split: str, field: str) -> None:
    """The files one split of a BEIR folder needs exist (what ``kdforge validate`` checks before a run)."""
    root = resolve_data_path(str(folder), field)
    for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv"):
        if not (root / name).is_file():
            raise DataError(f"{field}: {root} has no {name}; point {field} at a BEIR folder (corpus, queries, qrels/)")


def load_beir(folder: str | Path, split: str, field: str = "data.path") -> BeirData:
    """One split of a BEIR folder: ``corpus.jsonl``, ``queries.jsonl``, ``qrels/{split}.tsv``.

    ``folder`` may be relative to ``KDFORGE_DATA_DIR`` (see :func:`resolve_data_path`);
    ``field`` is the recipe field it came from, for the messages. As in BEIR, the queries
    are those that have qrels in the split (in the qrels' order), and qrels that name a
    doc absent from the corpus are kept (the doc cannot be retrieved, so it lowers recall).
    """
    root = resolve_data_path(str(folder), field)
    if not root.is_dir():
        raise DataError(f"{field}: {root} is a file; point at the BEIR folder holding corpus.jsonl and qrels/")
    qrels_file = root / "qrels" / f"{split}.tsv"
    if not qrels_file.is_file():
        found = sorted(p.stem for p in (root / "qrels").glob("*.tsv"))
        have = f"splits there: {', '.join(found)}" if found else "it has no qrels/*.tsv"
        raise DataError(f"{field}: {root} has no qrels/{split}.tsv ({have}); choose one of its splits")
    queries_file = _need_file(root / "queries.jsonl", field, "queries.jsonl (_id, text)")
    corpus_file = _need_file(root / "corpus.jsonl", field, "corpus.jsonl (_id, title, text)")

    qrels = _read_qrels(qrels_file, field)
    all_queries = _read_jsonl(queries_file, field, with_title=False)
    missing = [q for q in qrels if q not in all_queries]
    if missing:
        raise DataError(
            f"{field}: {qrels_file} judges {len(missing)} query id(s) absent from {queries_file}"
            f" (first: {missing[0]!r}); the qrels and queries come from different datasets"
        )
    queries = {q: all_queries[q] for q in qrels}
    corpus = _read_jsonl(corpus_file, field, with_title=True)
    return BeirData(corpus=corpus, queries=queries, qrels=qrels)


def load_wikiqa(folder: str | Path, split: str, field: str = "data.path") -> list[WikiQAQuestion]:
    """WikiQA's ``{split}.txt`` in ``folder`` (or ``folder`` itself when it is a file): every
    question with its candidate sentences.

    The folder holds the official splits of Yang et al. (2015) as ``train.txt``,
    ``dev.txt`` and ``test.txt``, so nothing is re-split here. Each line is
    ``question<TAB>sentence<TAB>label`` (no header, label 0 or 1); there are no question
    ids, so lines with the same question text form one question, in order of first
    appearance, with its candidates in file order. All questions are returned, those with
    no correct sentence included (they are still negatives for training);
    :func:`wikiqa_to_beir` drops them for evaluation.
    """
    root = resolve_data_path(str(folder), field)
    file = root / f"{split}.txt" if root.is_dir() else root
    if not file.is_file():
        found = sorted(p.stem for p in root.glob("*.txt"))
        have = f"splits there: {', '.join(found)}" if found else "it holds no .txt files"
        raise DataError(f"{field}: {root} has no {split}.txt ({have}); choose one of its splits")
    questions: dict[str, WikiQAQuestion] = {}
    for number, line in _lines(file, field):
        where = f"{file}:{number}"
        columns = line.split("\t")
        if len(columns) != 3:
            raise DataError(
                f"{field}: {where} has {len(columns)} tab-separated columns; WikiQA lines have 3"
                " (question, sentence, label)"
            )
        question, sentence, label = columns
        if label.strip() not in ("0", "1"):
            raise DataError(f"{field}: {where}: label {label!r} is not 0 or 1")
        group = questions.setdefault(question, WikiQAQuestion(question))
        group.candidates.append(sentence)
        group.labels.append(int(label))
    if not questions:
        raise DataError(f"{field}: {file} holds no lines")
    return list(questions.values())


def wikiqa_to_beir(questions: Sequence[WikiQAQuestion]) -> BeirData:
    """WikiQA questions as :class:`BeirData` whose ``pools`` hold each question's own candidates.

    Questions with no correct sentence are dropped: MAP and MRR are undefined for them,
    and the standard WikiQA evaluation (Yang et al., 2015, and the work that follows it)
    scores only questions with at least one answer. Question ``i`` of ``questions`` gets
    the id ``q{i}`` (so ids do not shift when others are dropped) and its ``j``-th
    candidate ``q{i}-{j}``; qrels list the correct sentences with relevance 1.
    """
    corpus: dict[str, str] = {}
    queries: dict[str, str] = {}
    qrels: dict[str, dict[str, int]] = {}
    pools: dict[str, list[str]] = {}
    for i, item in enumerate(questions):
        if not item.has_answer:
            continue
        query_id = f"q{i}"
        doc_ids = [f"{query_id}-{j}" for j in range(len(item.candidates))]
        corpus.update(zip(doc_ids, item.candidates))
        queries[query_id] = item.question
        qrels[query_id] = {d: 1 for d, label in zip(doc_ids, item.labels) if label > 0}
        pools[query_id] = doc_ids
    return BeirData(corpus=corpus, queries=queries, qrels=qrels, pools=pools)
