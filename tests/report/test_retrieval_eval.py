"""Retrieval readers (BEIR, WikiQA) and evaluation (exact search, IR metrics, speed).

Expected metric values are computed from their formulas here, never by ranx.
"""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from kdforge.data.beir import (
    BeirData,
    WikiQAQuestion,
    load_beir,
    load_wikiqa,
    resolve_data_path,
    wikiqa_to_beir,
)
from kdforge.errors import DataError, KDForgeError
from kdforge.eval.retrieval import (
    encode_throughput,
    evaluate_candidate_ranking,
    evaluate_dense_retrieval,
    query_latency,
    retrieval_metrics,
    search,
)

SHARED_DATA = Path(os.environ.get("KDFORGE_DATA_DIR", "../shared/data"))
SCIFACT = SHARED_DATA / "scifact"
WIKIQA = SHARED_DATA / "wikiqa"


def write_beir(
    root: Path,
    corpus: list[dict],
    queries: list[dict],
    qrels: dict[str, str],
) -> Path:
    """A BEIR folder: JSON lines as given, ``qrels`` maps split -> TSV body (header added)."""
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus), encoding="utf-8")
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries), encoding="utf-8")
    for split, body in qrels.items():
        (root / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" + body, encoding="utf-8")
    return root


@pytest.fixture
def tiny_beir(tmp_path) -> Path:
    return write_beir(
        tmp_path / "tiny",
        corpus=[
            {"_id": "d1", "title": "Cats", "text": "cats purr"},
            {"_id": "d2", "title": "", "text": "dogs bark "},
            {"_id": 3, "text": "birds sing"},  # numeric id, no title
            {"_id": "d4", "title": "Fish", "text": ""},
        ],
        queries=[
            {"_id": "q1", "text": "what purrs"},
            {"_id": "q2", "text": "who barks"},
            {"_id": "q3", "text": "unjudged in test"},
        ],
        qrels={"test": "q1\td1\t1\nq2\td2\t2\nq2\t3\t0\n", "train": "q3\td4\t1\n"},
    )


# ----- paths and readers --------------------------------------------------------------


def test_resolve_data_path_as_given_else_under_data_dir(tmp_path, monkeypatch):
    data = tmp_path / "data"
    (data / "sets" / "mine").mkdir(parents=True)
    monkeypatch.setenv("KDFORGE_DATA_DIR", str(data))
    assert resolve_data_path(str(data / "sets")) == data / "sets"  # absolute
    assert resolve_data_path("sets/mine") == data / "sets" / "mine"  # relative to the data dir
    monkeypatch.chdir(data / "sets")
    assert resolve_data_path("mine") == Path("mine")  # exists from the current folder


def test_resolve_data_path_missing_names_field_and_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("KDFORGE_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError) as info:
        resolve_data_path("nowhere/scifact", field="data.eval_path")
    message = str(info.value)
    assert message.startswith("data.eval_path: nowhere/scifact does not exist")
    assert "KDFORGE_DATA_DIR" in message and "\n" not in message
    assert isinstance(info.value, KDForgeError)
    with pytest.raises(DataError, match="data.path: .* does not exist; set data.path"):
        resolve_data_path(str(tmp_path / "absent"))


def test_load_beir_joins_titles_and_keeps_split_queries(tiny_beir):
    data = load_beir(tiny_beir, "test")
    # title + " " + text, stripped; missing or empty title gives the text alone
    assert data.corpus == {"d1": "Cats cats purr", "d2": "dogs bark", "3": "birds sing", "d4": "Fish"}
    assert list(data.corpus) == ["d1", "d2", "3", "d4"]  # file order: the embedding rows
    assert data.queries == {"q1": "what purrs", "q2": "who barks"}  # q3 has no test qrels
    assert data.qrels == {"q1": {"d1": 1}, "q2": {"d2": 2, "3": 0}}  # zero judgements kept
    assert data.pools is None
    train = load_beir(tiny_beir, "train")
    assert train.queries == {"q3": "unjudged in test"}


def test_load_beir_relative_to_data_dir(tiny_beir, monkeypatch):
    monkeypatch.setenv("KDFORGE_DATA_DIR", str(tiny_beir.parent))
    assert len(load_beir("tiny", "test").corpus) == 4


def test_load_beir_missing_split_lists_the_splits(tiny_beir):
    with pytest.raises(DataError, match=r"data.path: .* has no qrels/dev.tsv \(splits there: test, train\)"):
        load_beir(tiny_beir, "dev")


def test_load_beir_missing_corpus(tiny_beir):
    (tiny_beir / "corpus.jsonl").unlink()
    with pytest.raises(DataError, match="corpus.jsonl does not exist"):
        load_beir(tiny_beir, "test")


@pytest.mark.parametrize(
    "file, content, expected",
    [
        ("corpus.jsonl", '{"_id": "d1", "text": "ok"}\n{"_id": "d2", "text": \n', r"corpus.jsonl:2 is not valid JSON"),
        ("corpus.jsonl", '{"_id": "d1", "text": "ok"}\n\n["d2"]\n', r"corpus.jsonl:3 is a JSON list"),
        ("corpus.jsonl", '{"id": "d1", "text": "ok"}\n', r"corpus.jsonl:1 has no string '_id' \(it has 'id', 'text'\)"),
        ("corpus.jsonl", '{"_id": "d1", "text": 5}\n', r"corpus.jsonl:1 has no string 'text'"),
        ("corpus.jsonl", '{"_id": "d1", "text": "a"}\n{"_id": "d1", "text": "b"}\n', r"corpus.jsonl:2 repeats the id"),
        ("queries.jsonl", '{"_id": "q1"}\n', r"queries.jsonl:1 has no string 'text'"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\n", r"test.tsv:2 has 2 tab-separated columns"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq1\td1\tyes\n", r"test.tsv:2: score 'yes' is not an integer"),
        ("qrels/test.tsv", "query-id\tcorpus-id\tscore\nq9\td1\t1\n", r"judges 1 query id\(s\) absent .* 'q9'"),
    ],
)
def test_load_beir_malformed_names_file_and_line(tiny_beir, file, content, expected):
    (tiny_beir / file).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=expected) as info:
        load_beir(tiny_beir, "test", field="data.eval_path")
    assert str(info.value).startswith("data.eval_path: ")


def test_load_beir_non_utf8_names_the_line(tiny_beir):
    (tiny_beir / "queries.jsonl").write_bytes(b'{"_id": "q1", "text": "a"}\n{"_id": "q2", "text": "\xff"}\n')
    with pytest.raises(DataError, match=r"queries.jsonl:2 is not UTF-8"):
        load_beir(tiny_beir, "test")


WIKIQA_LINES = [
    "how do cats purr ?\tCats are mammals .\t0",
    "how do cats purr ?\tThe larynx vibrates .\t1",
    "who wrote hamlet ?\tHamlet is a play .\t0",  # no correct sentence: dropped for evaluation
    "where is paris ?\tParis is in France .\t1",
    "where is paris ?\tIt is a capital .\t0",
    "where is paris ?\tParis lies on the Seine .\t1",
]


@pytest.fixture
def tiny_wikiqa(tmp_path) -> Path:
    root = tmp_path / "wikiqa"
    root.mkdir()
    (root / "test.txt").write_text("\n".join(WIKIQA_LINES) + "\n", encoding="utf-8")
    return root


def test_load_wikiqa_groups_candidates_per_question(tiny_wikiqa):
    questions = load_wikiqa(tiny_wikiqa, "test")
    assert [q.question for q in questions] == ["how do cats purr ?", "who wrote hamlet ?", "where is paris ?"]
    assert questions[0].candidates == ["Cats are mammals .", "The larynx vibrates ."]
    assert [q.labels for q in questions] == [[0, 1], [0], [1, 0, 1]]
    assert [q.has_answer for q in questions] == [True, False, True]


def test_wikiqa_to_beir_drops_questions_without_positive(tiny_wikiqa):
    data = wikiqa_to_beir(load_wikiqa(tiny_wikiqa, "test"))
    assert data.queries == {"q0": "how do cats purr ?", "q2": "where is paris ?"}
    assert data.pools == {"q0": ["q0-0", "q0-1"], "q2": ["q2-0", "q2-1", "q2-2"]}
    assert data.qrels == {"q0": {"q0-1": 1}, "q2": {"q2-0": 1, "q2-2": 1}}
    assert data.corpus["q2-2"] == "Paris lies on the Seine ."
    assert "q1-0" not in data.corpus


def test_load_wikiqa_errors(tiny_wikiqa):
    with pytest.raises(DataError, match=r"has no dev.txt \(splits there: test\)"):
        load_wikiqa(tiny_wikiqa, "dev")
    (tiny_wikiqa / "test.txt").write_text("q ?\ta .\t1\nq ?\tb .\t2\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"test.txt:2: label '2' is not 0 or 1"):
        load_wikiqa(tiny_wikiqa, "test")
    (tiny_wikiqa / "test.txt").write_text("q ?\ta .\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"test.txt:1 has 2 tab-separated columns"):
        load_wikiqa(tiny_wikiqa, "test")


# ----- search ---------------------------------------------------------------------------


def test_search_matches_numpy_brute_force():
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((9, 16))  # float64 in: cast to float32
    docs = rng.standard_normal((40, 16))
    scores, indices = search(queries, docs, k=5)
    expected = queries.astype(np.float32) @ docs.astype(np.float32).T
    order = np.argsort(-expected, axis=1)[:, :5]
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    assert scores.shape == indices.shape == (9, 5)
    np.testing.assert_array_equal(indices, order)
    np.testing.assert_allclose(scores, np.take_along_axis(expected, order, axis=1), rtol=1e-5, atol=1e-5)


def test_search_clips_k_to_the_corpus_and_checks_shapes():
    rng = np.random.default_rng(1)
    scores, indices = search(rng.standard_normal((2, 4)), rng.standard_normal((3, 4)), k=100)
    assert scores.shape == (2, 3)
    assert sorted(indices[0].tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="dimensions"):
        search(np.ones((1, 4)), np.ones((3, 5)), k=1)
    with pytest.raises(ValueError, match="2-D"):
        search(np.ones(4), np.ones((3, 4)), k=1)


# ----- metrics --------------------------------------------------------------------------


def dcg(gains: list[float]) -> float:
    """Linear-gain DCG of the gains in rank order (rank 1 first)."""
    return sum(g / math.log2(rank + 1) for rank, g in enumerate(gains, start=1))


def test_metrics_against_hand_computed_values():
    qrels = {
        "q1": {"d1": 2, "d2": 1, "d3": 0},  # graded; d3 judged not relevant
        "q2": {"d4": 1, "d6": 1},
        "q3": {"d5": 1},  # absent from the run: scores 0
    }
    run = {
        "q1": {"d3": 0.9, "d1": 0.8, "d9": 0.7, "d2": 0.6},
        "q2": {"d7": 0.9, "d8": 0.8, "d4": 0.7},
        "ignored": {"d1": 1.0},  # not in the qrels: left out of the mean
    }
    got = retrieval_metrics(qrels, run, ("ndcg@10", "recall@100", "mrr@10", "map", "recall@2"))

    ndcg_q1 = dcg([0, 2, 0, 1]) / dcg([2, 1])
    ndcg_q2 = dcg([0, 0, 1]) / dcg([1, 1])
    assert got["ndcg@10"] == pytest.approx((ndcg_q1 + ndcg_q2 + 0) / 3)
    assert got["mrr@10"] == pytest.approx((1 / 2 + 1 / 3 + 0) / 3)
    assert got["recall@100"] == pytest.approx((2 / 2 + 1 / 2 + 0) / 3)
    assert got["recall@2"] == pytest.approx((1 / 2 + 0 + 0) / 3)
    # AP: mean over the relevant docs of precision at their ranks (unretrieved ones add 0)
    ap_q1 = (1 / 2 + 2 / 4) / 2
    ap_q2 = (1 / 3) / 2
    assert got["map"] == pytest.approx((ap_q1 + ap_q2 + 0) / 3)
    assert all(type(v) is float for v in got.values())


def test_ndcg_binary_relevance_and_cutoff():
    qrels = {"a": {"x": 1, "y": 1, "z": 1}}
    ranked = [f"n{i}" for i in range(9)] + ["x", "y"]  # x at rank 10, y at 11 (past the cutoff)
    run = {"a": {doc: 100.0 - i for i, doc in enumerate(ranked)}}
    got = retrieval_metrics(qrels, run, ("ndcg@10", "mrr@10", "recall@10"))
    assert got["ndcg@10"] == pytest.approx((1 / math.log2(11)) / dcg([1, 1, 1]))
    assert got["mrr@10"] == pytest.approx(1 / 10)
    assert got["recall@10"] == pytest.approx(1 / 3)


def test_query_missing_from_run_scores_zero():
    qrels = {"a": {"x": 1}, "b": {"y": 1}, "only-zero": {"z": 0}}  # no relevant doc: not counted
    perfect_a = {"a": {"x": 1.0}}
    assert retrieval_metrics(qrels, perfect_a, ("ndcg@10", "mrr@10")) == {"ndcg@10": 0.5, "mrr@10": 0.5}
    assert retrieval_metrics(qrels, {"a": {"x": 1.0}, "b": {}}, ("mrr@10",)) == {"mrr@10": 0.5}
    assert retrieval_metrics(qrels, {}, ("ndcg@10", "map")) == {"ndcg@10": 0.0, "map": 0.0}
    with pytest.raises(ValueError, match="no document relevant"):
        retrieval_metrics({"a": {"x": 0}}, perfect_a)


# ----- evaluation with encoders ---------------------------------------------------------

VOCAB = ["cats", "dogs", "birds", "fish", "purr", "bark"]


def bag_of_words(texts: list[str]) -> np.ndarray:
    """[N, len(VOCAB)] word counts: a transparent stand-in for a text encoder."""
    return np.array([[t.lower().split().count(w) for w in VOCAB] for t in texts], dtype=np.float32)


def test_evaluate_dense_retrieval_end_to_end(tiny_beir):
    data = load_beir(tiny_beir, "test")
    calls = []

    def encode(texts):
        calls.append(len(texts))
        return bag_of_words(texts)

    data.queries = {"q1": "cats purr", "q2": "dogs bark"}  # queries the toy encoder can match
    metrics, run = evaluate_dense_retrieval(encode, encode, data, k=3, batch_size=3, metrics=["mrr@3"], return_run=True)
    assert metrics == {"mrr@3": 1.0}
    assert calls == [3, 1, 2]  # 4 docs in batches of 3, then the 2 queries
    assert list(run["q1"])[0] == "d1" and len(run["q2"]) == 3
    assert run["q2"]["d2"] == pytest.approx(2.0)  # inner product of the word counts
    with pytest.raises(ValueError, match="ndcg@10 needs 10 results per query but k=3"):
        evaluate_dense_retrieval(encode, encode, data, k=3)


def test_evaluate_candidate_ranking_map_mrr(tiny_wikiqa):
    questions = load_wikiqa(tiny_wikiqa, "test")
    # hand-set scores: q0 ranks its answer first; q2 ranks "It is a capital ." (wrong) first
    by_sentence = {
        "Cats are mammals .": 0.1,
        "The larynx vibrates .": 0.9,
        "Paris is in France .": 0.5,
        "It is a capital .": 0.8,
        "Paris lies on the Seine .": 0.2,
    }
    seen = []

    def score_fn(query, candidates):
        seen.append(query)
        return [by_sentence[c] for c in candidates]

    got = evaluate_candidate_ranking(questions, score_fn=score_fn)
    # q2's order: wrong, right (rank 2), right (rank 3)
    assert got["map"] == pytest.approx((1.0 + (1 / 2 + 2 / 3) / 2) / 2)
    assert got["mrr"] == pytest.approx((1.0 + 1 / 2) / 2)
    assert seen == ["how do cats purr ?", "where is paris ?"]  # the question without answer is skipped

    # encoders: the same ranking through inner products of one-dimensional embeddings
    def encode(texts):
        return np.array([[by_sentence.get(t, 1.0)] for t in texts])

    assert evaluate_candidate_ranking(wikiqa_to_beir(questions), encode_queries=encode) == pytest.approx(got)
    with pytest.raises(ValueError, match="either score_fn or encode_queries"):
        evaluate_candidate_ranking(questions)
    with pytest.raises(ValueError, match="no candidate pools"):
        evaluate_candidate_ranking(BeirData({}, {}, {}), score_fn=score_fn)


def test_wikiqa_questions_type():
    q = WikiQAQuestion("q ?", ["a", "b"], [0, 0])
    assert not q.has_answer
    assert wikiqa_to_beir([q]).queries == {}


def test_speed_helpers_are_positive():
    texts = ["cats purr"] * 8
    rate = encode_throughput(bag_of_words, texts, repeats=3, batch_size=3)
    assert rate > 0 and math.isfinite(rate)
    ms = query_latency(bag_of_words, texts[:3], repeats=3)
    assert ms > 0
    with_search = query_latency(bag_of_words, texts[:3], repeats=1, doc_emb=bag_of_words(["cats", "dogs"]), k=10)
    assert with_search > 0


# ----- the real datasets ------------------------------------------------------------------


@pytest.mark.skipif(
    not (SCIFACT / "corpus.jsonl").is_file(), reason=f"SciFact is not at {SCIFACT} (set KDFORGE_DATA_DIR)"
)
def test_real_scifact_counts():
    test = load_beir(SCIFACT, "test")
    assert len(test.corpus) == 5183
    assert len(test.queries) == 300
    assert sum(len(docs) for docs in test.qrels.values()) == 339
    train = load_beir(SCIFACT, "train")
    assert len(train.queries) == 809
    assert sum(len(docs) for docs in train.qrels.values()) == 919
    assert not set(train.queries) & set(test.queries)


@pytest.mark.skipif(not (WIKIQA / "test.txt").is_file(), reason=f"WikiQA is not at {WIKIQA} (set KDFORGE_DATA_DIR)")
def test_real_wikiqa_counts():
    # Yang et al. (2015): 2,118 / 296 / 633 questions, of which 873 / 126 / 243 have an answer
    for split, total, answered, sentences in (
        ("train", 2118, 873, 20360),
        ("dev", 296, 126, 2733),
        ("test", 633, 243, 6165),
    ):
        questions = load_wikiqa(WIKIQA, split)
        assert len(questions) == total
        assert sum(len(q.candidates) for q in questions) == sentences
        assert len(wikiqa_to_beir(questions).queries) == answered
