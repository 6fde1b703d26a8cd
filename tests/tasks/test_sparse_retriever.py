"""The inference-free sparse retriever: model-free queries, document weights, BM25 and ensemble teachers,
the inverted index, the FLOPS warm-up, and a whole run whose student loads as a sentence-transformers
SparseEncoder. Runs use the real all-MiniLM-L6-v2 on the tiny BEIR folder of test_tasks_encoders."""

import math

import bm25s
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sentence_transformers import SparseEncoder

from kdforge.checks import parse_recipe
from kdforge.eval.sparse_index import SparseIndex, query_terms
from kdforge.models.bm25 import BM25Scorer
from kdforge.models.sparse_encoder import document_transformer, document_weights, idf_weights
from kdforge.objective import Objective
from kdforge.outputs import ModelOutputs
from kdforge.recipe import ObjectiveTerm
from kdforge.runner import run_recipe
from kdforge.signals import build_signal
from kdforge.signals.ensemble import minmax_per_query
from kdforge.tasks import TASKS
from test_tasks_encoders import TEACHER, _recipe, beir_dir  # noqa: F401  (beir_dir is a fixture)

ENSEMBLE = {"signal": "ensemble", "members": [{"model": TEACHER}, {"model": "bm25"}]}
OBJECTIVE = [
    {"loss": "listwise_kl", "field": "scores", "params": {"teacher_temperature": 1 / 30}},
    {
        "loss": "flops",
        "field": "doc_weights",
        "weight": 0.002,
        "schedule": {"shape": "quadratic", "start": 0.0, "end": 1.0, "steps": 2},
    },
]


def _sparse_recipe(folder, tmp_path, *overrides, teacher=ENSEMBLE, student=None):
    recipe = _recipe(
        "sparse_retriever",
        folder,
        tmp_path,
        OBJECTIVE,
        "methods=[{name: tasb_batches, clusters: 2}]",  # as data.sampler's default was
        *overrides,
        student=student or {"model": TEACHER},
        data={"negatives": 2},
    )
    raw = recipe.model_dump(mode="json")
    raw["teacher"] = teacher
    return parse_recipe(raw, [])


@pytest.fixture
def task(beir_dir, tmp_path):  # noqa: F811
    return TASKS.get("sparse_retriever")(_sparse_recipe(beir_dir, tmp_path))


def test_a_bi_encoder_gets_a_head_tied_to_its_word_embeddings(task):
    student = task.build_student()
    mlm = document_transformer(student).auto_model
    assert mlm.cls.predictions.decoder.weight.data_ptr() == mlm.get_input_embeddings().weight.data_ptr()
    assert torch.equal(mlm.cls.predictions.transform.dense.weight, torch.eye(384))
    assert torch.all(mlm.cls.predictions.bias == -5.0)
    # the strongest terms of a document are its own words
    inputs = task.family.tokens(["Vaccines train the adaptive immune system."], 32)
    weights = document_weights(student, inputs)[0]
    top = task.family.tokenizer.convert_ids_to_tokens(weights.topk(5).indices)
    assert {"vaccines", "immune"} <= set(top)
    assert 0 < int((weights > 0).sum()) < 3000


def test_layers_keep_a_subset(beir_dir, tmp_path):  # noqa: F811
    recipe = _sparse_recipe(beir_dir, tmp_path, student={"model": TEACHER, "layers": [0, 5]})
    student = TASKS.get("sparse_retriever")(recipe).build_student()
    assert len(document_transformer(student).auto_model.bert.encoder.layer) == 2


def test_the_query_side_runs_with_no_model(task, monkeypatch):
    student = task.build_student()

    def no_model(*args, **kwargs):
        raise AssertionError("a query must not run the document encoder")

    monkeypatch.setattr(document_transformer(student).auto_model, "forward", no_model)
    queries = ["Do chaperones help proteins fold?", "Does fibre reduce cholesterol?"]
    vectors = task.family.query_matrix(student, queries)
    for row, query in enumerate(queries):
        terms, weights = query_terms(vectors, row)
        ids = set(task.family.tokenizer(query, add_special_tokens=False)["input_ids"])
        assert set(terms.tolist()) == ids
        np.testing.assert_allclose(weights, task.family.idf[terms].numpy())
    # the same vectors as sentence-transformers' own query side of the saved format
    expected = student.encode_query(queries, convert_to_tensor=True).to_dense()
    np.testing.assert_allclose(vectors.toarray(), expected.numpy(), rtol=1e-6)


def test_idf_is_computed_on_the_corpus(task):
    texts = list(task.data.train_collection.corpus.values())
    token = task.family.tokenizer.convert_tokens_to_ids("fibre")
    df = sum(token in task.family.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts)
    assert df == 2
    assert task.family.idf[token].item() == pytest.approx(math.log1p((len(texts) - df + 0.5) / (df + 0.5)))
    assert task.family.idf[task.family.tokenizer.all_special_ids].eq(0).all()
    # binary weights for the plain-FLOPS ablation
    small = idf_weights(task.family.tokenizer, ["a b", "a c"], [0])
    assert (
        small[task.family.tokenizer.convert_tokens_to_ids("a")]
        < small[task.family.tokenizer.convert_tokens_to_ids("b")]
    )


def test_document_weights_match_sentence_transformers(task):
    student = task.build_student().eval()
    docs = ["Sleep deprivation impairs memory consolidation.", "Gut bacteria digest dietary fibre."]
    with torch.no_grad():
        ours = document_weights(student, task.family.tokens(docs, 32))
    theirs = student.encode_document(docs, convert_to_tensor=True).to_dense()
    theirs[:, task.family.tokenizer.all_special_ids] = 0  # kdforge drops terms no query can have
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_bm25_teacher_scores_as_bm25s_does(task):
    corpus = task.data.train_collection.corpus
    bm25 = BM25Scorer(corpus)
    doc_ids = ["d20", "d21", "f3"]
    scores = bm25.scores(["Are the oceans getting warmer?"], doc_ids)
    retriever = bm25s.BM25()
    retriever.index(bm25.tokenize(list(corpus.values())), show_progress=False)
    rows, expected = retriever.retrieve(bm25.tokenize(["Are the oceans getting warmer?"]), k=len(corpus))
    by_row = dict(zip(rows[0].tolist(), expected[0].tolist()))
    assert scores[0].tolist() == pytest.approx([by_row[bm25.row[d]] for d in doc_ids])
    assert scores[0, 0] > 0 and scores[0, 2] == 0  # the ocean document matches, the filler does not


def test_ensemble_normalises_each_query_before_averaging(task):
    dataset = task.splits().train
    batch = task.collate([dataset[i] for i in range(3)])
    signal = build_signal(task, task.recipe.teacher, frozenset({"scores"})).signal
    mixed = signal.outputs(batch, frozenset({"scores"})).scores
    dense = task.adapter(task.load_teacher(TEACHER), batch, frozenset({"scores"})).scores
    lexical = task.adapter(task.family.bm25, batch, frozenset({"scores"})).scores
    assert dense.shape == lexical.shape == (3, 3 * 2)  # every query against the batch's 6 documents
    torch.testing.assert_close(mixed, 0.5 * minmax_per_query(dense) + 0.5 * minmax_per_query(lexical))
    # per query: a row's normalisation ignores the other rows (scaling one query's BM25 scores changes nothing)
    scaled = lexical.clone()
    scaled[0] *= 100
    torch.testing.assert_close(minmax_per_query(scaled), minmax_per_query(lexical))


def test_flops_weight_warms_up_quadratically(task):
    objective = Objective(task.recipe.objective, total_steps=10, names=task.recipe.term_names())
    weights = torch.rand(2, 2, 50)
    scores = torch.randn(2, 4)
    student = ModelOutputs(scores=scores, doc_weights=weights)
    teacher = ModelOutputs(scores=scores / 30)  # teacher_temperature 1/30: the KL term is 0
    flops = (weights.abs().mean(0) ** 2).sum().item()
    for step, factor in ((0, 0.0), (1, 0.25), (2, 1.0), (7, 1.0)):
        loss, _ = objective(student, teacher, {}, step)
        assert loss.item() == pytest.approx(0.002 * factor * flops, abs=1e-6)


def test_sparse_index_searches_like_a_dense_product():
    rng = np.random.default_rng(0)
    docs = sp.random(200, 500, density=0.02, random_state=0, format="csr", dtype=np.float32)
    index = SparseIndex.build(docs)
    terms = rng.choice(500, 6, replace=False)
    weights = rng.random(6).astype(np.float32)
    top, scores = index.search(terms, weights, 10)
    dense = docs.toarray()[:, terms] @ weights
    expected = np.argsort(-dense, kind="stable")[:10]
    expected = expected[dense[expected] > 0]
    assert top.tolist() == expected.tolist()
    np.testing.assert_allclose(scores, dense[expected], rtol=1e-6)
    assert index.nbytes() == docs.nnz * 8 + 501 * 4  # int32 doc numbers and float32 weights, one offset per term


def test_run_saves_a_sparse_encoder_that_reproduces_its_metrics(task):
    report = run_recipe(task.recipe)
    models = report["runs"][0]["models"]
    student = models["student"]
    assert {"ndcg@10", "recall@100", "query_ms", "doc_nonzeros", "bytes_per_doc", "index_build_s"} <= set(
        student["metrics"]
    )
    assert models["baseline"]["train"]["final_terms"].keys() == {"contrastive"}
    assert student["size_bytes"] > 10_000_000  # the document encoder's weights were found and counted
    assert set(student["train"]["final_terms"]) == {"listwise_kl", "flops"}
    folder = task.recipe.run_dir / "model"
    loaded = SparseEncoder(str(folder), device="cpu")
    assert "kdforge" in (folder / "README.md").read_text()
    again = task.evaluate(loaded, task.evaluator.test_set()).metrics
    assert again["ndcg@10"] == pytest.approx(student["metrics"]["ndcg@10"])
    assert again["doc_nonzeros"] == pytest.approx(student["metrics"]["doc_nonzeros"])


def test_bm25_alone_is_a_teacher_in_the_report(beir_dir, tmp_path):  # noqa: F811
    recipe = _sparse_recipe(
        beir_dir, tmp_path, "evaluation.baseline=false", f"data.miner={TEACHER}", teacher={"model": "bm25"}
    )
    report = run_recipe(recipe)
    teacher = report["runs"][0]["models"]["teacher"]
    assert teacher["params"] == 0 and teacher["size_bytes"] == 0
    assert teacher["metrics"]["ndcg@10"] > 0.5  # each test claim shares words with its document
    assert teacher["metrics"]["doc_nonzeros"] > 0


def test_binary_query_weights_are_the_plain_flops_ablation(beir_dir, tmp_path):  # noqa: F811
    recipe = _sparse_recipe(beir_dir, tmp_path, student={"model": TEACHER, "query_weights": "binary"})
    task = TASKS.get("sparse_retriever")(recipe)
    special = task.family.tokenizer.all_special_ids
    assert task.family.idf[special].eq(0).all()
    keep = torch.ones_like(task.family.idf, dtype=torch.bool)
    keep[special] = False
    assert task.family.idf[keep].eq(1).all()


def test_a_hub_student_fails_clearly_offline(beir_dir, tmp_path, monkeypatch):  # noqa: F811
    from kdforge.errors import ModelRefError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = _sparse_recipe(beir_dir, tmp_path, student={"model": "opensearch-project/some-sparse-model"})
    task = TASKS.get("sparse_retriever")(recipe)
    with pytest.raises(ModelRefError, match=r"student.model: 'opensearch-project/some-sparse-model'.*Hub"):
        task.build_student()


def test_margin_mse_is_an_option(task):
    """Margin-MSE on the same scores: the positive is column 0 of each row, as in the ranking task."""
    objective = Objective([ObjectiveTerm(loss="margin_mse", field="scores")], total_steps=1)
    dataset = task.splits().train
    batch = task.collate([dataset[i] for i in range(2)])
    student = task.build_student()
    signal = build_signal(task, task.recipe.teacher, frozenset({"scores"})).signal
    loss, _ = objective(
        task.adapter(student, batch, frozenset({"scores"})), signal.outputs(batch, frozenset({"scores"})), batch, 0
    )
    loss.backward()
    grad = document_transformer(student).auto_model.cls.predictions.bias.grad
    assert torch.isfinite(loss) and grad is not None and grad.abs().sum() > 0
