"""Task vq_index (Distill-VQ): batches, the index as a student, its faiss export, baseline and whole runs.

Runs use the real all-MiniLM-L6-v2 on the tiny BEIR folder of test_tasks_encoders (24 documents),
with an index small enough for it: 4 lists, 8 sub-quantizers of 4 bits.
"""

import json

import faiss
import numpy as np
import pytest
import torch

from kdforge.engine.optim import build_optimizer
from kdforge.engine.trainer import model_parameter_groups
from kdforge.errors import RecipeError
from kdforge.eval.retrieval import retrieval_metrics
from kdforge.models.ivfpq import IVFPQStudent, build_faiss_index
from kdforge.runner import run_recipe
from kdforge.tasks import TASKS
from test_tasks_encoders import TEACHER, _recipe, beir_dir  # noqa: F401  (beir_dir is a fixture)

OBJECTIVE = [
    {"loss": "listnet", "field": "scores", "params": {"temperature": 0.05}},
    {"loss": "listnet", "field": "ivf_scores", "weight": 0.1, "params": {"temperature": 0.05}},
]
STUDENT = {"nlist": 4, "m": 8, "nbits": 4, "nprobe": 2}


def _vq_recipe(folder, tmp_path, *overrides, **sections):
    sections.setdefault("student", STUDENT)
    sections.setdefault("data", {"top_k": 5, "document_queries": 6})
    return _recipe("vq_index", folder, tmp_path, OBJECTIVE, *overrides, **sections)


@pytest.fixture
def task(beir_dir, tmp_path):  # noqa: F811
    return TASKS.get("vq_index")(_vq_recipe(beir_dir, tmp_path))


def test_a_batch_holds_its_queries_and_the_union_of_their_candidates(task):
    queries, top = task.data.train_queries
    assert queries.shape == (6 + 6, 384)  # 6 training claims and 6 documents used as queries
    assert top.shape == (12, 5)
    np.testing.assert_allclose(np.linalg.norm(task.family.doc_emb, axis=1), 1.0, rtol=1e-5)  # cosine teacher: unit rows
    batch = task.collate([0, 1, 2])
    expected = np.unique(top[[0, 1, 2]])
    assert batch["doc_index"].tolist() == expected.tolist()
    teacher = task.adapter(task.load_teacher(TEACHER), batch, frozenset({"scores", "ivf_scores"}))
    exact = torch.from_numpy(queries[:3] @ task.family.doc_emb[expected].T)
    torch.testing.assert_close(teacher.scores, exact)
    torch.testing.assert_close(teacher.ivf_scores, exact)
    student = task.build_student()
    out = task.adapter(student, batch, frozenset({"scores", "ivf_scores"}))
    assert out.scores.shape == out.ivf_scores.shape == (3, len(expected))
    assert out.scores.requires_grad


def test_centroids_train_faster_than_codebooks(task):
    student = task.build_student()
    optimizer = build_optimizer(model_parameter_groups(student), task.recipe.training)
    lrs = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert lrs[id(student.codebooks)] == pytest.approx(1e-4)
    assert lrs[id(student.centroids)] == pytest.approx(1e-3)  # ivf_lr_scale 10 by default


def test_the_baseline_is_faiss_own_index(task):
    """The untrained student searches exactly as faiss's IVF-PQ trained for reconstruction."""
    student = task.build_student()
    ours = task.evaluate(student, task.family.collection).metrics
    index = build_faiss_index(task.family.spec(), task.family.doc_emb, seed=task.recipe.training.seed)
    faiss.extract_index_ivf(index).nprobe = 2
    scores, rows = index.search(task.family.test_query_emb, len(task.family.doc_emb))
    data = task.family.collection.data
    run = {
        q: {task.family.collection.doc_ids[j]: float(s) for j, s in zip(rows[i], scores[i]) if j >= 0}
        for i, q in enumerate(data.queries)
    }
    theirs = retrieval_metrics(data.qrels, run, ("ndcg@10", "recall@100"))
    assert ours["ndcg@10"] == pytest.approx(theirs["ndcg@10"], abs=1e-6)
    assert ours["recall@100"] == pytest.approx(theirs["recall@100"], abs=1e-6)
    assert ours["code_bytes_per_doc"] == 8 * 4 / 8 + 8  # 8 sub-quantizers x 4 bits, and the id


def test_run_exports_a_faiss_index_that_reproduces_the_report(task):
    report = run_recipe(task.recipe)
    models = report["runs"][0]["models"]
    assert set(models) == {"teacher", "student", "baseline"}
    assert models["baseline"]["train"]["untrained"] is True
    student = models["student"]
    assert {"ndcg@10", "recall@100", "query_ms", "index_bytes", "bytes_per_doc", "index_build_s"} <= set(
        student["metrics"]
    )
    assert models["teacher"]["metrics"]["code_bytes_per_doc"] == 384 * 4
    folder = task.recipe.run_dir / "model"
    index = faiss.read_index(str(folder / "index.faiss"))
    assert student["size_bytes"] == (folder / "index.faiss").stat().st_size
    doc_ids = json.loads((folder / "doc_ids.json").read_text())
    scores, rows = index.search(task.family.test_query_emb, 100)
    data = task.family.collection.data
    run = {q: {doc_ids[j]: float(s) for j, s in zip(rows[i], scores[i]) if j >= 0} for i, q in enumerate(data.queries)}
    assert retrieval_metrics(data.qrels, run, ("ndcg@10",))["ndcg@10"] == pytest.approx(
        student["metrics"]["ndcg@10"], abs=1e-6
    )
    # the saved state resumes into the same index
    loaded = task.load_saved(folder)
    assert isinstance(loaded, IVFPQStudent)
    assert task.evaluate(loaded, task.family.collection).metrics["ndcg@10"] == pytest.approx(
        student["metrics"]["ndcg@10"]
    )
    # training moved the codebooks away from faiss's
    baseline = task.load_saved(task.recipe.run_dir / "baseline")
    assert not torch.equal(loaded.codebooks, baseline.codebooks)


@pytest.mark.parametrize(
    ("teacher", "fragment"),
    [
        ({"signal": "cache", "path": "x", "model": TEACHER}, "embedding cache"),
        ({"signal": "ensemble", "members": [{"model": TEACHER}]}, "name that bi-encoder"),
    ],
)
def test_teachers_that_cannot_give_embeddings_are_refused(beir_dir, tmp_path, teacher, fragment):  # noqa: F811
    from kdforge.checks import parse_recipe

    raw = _vq_recipe(beir_dir, tmp_path).model_dump(mode="json")
    raw["teacher"] = teacher
    with pytest.raises(RecipeError, match=fragment):
        TASKS.get("vq_index")(parse_recipe(raw, []))


def test_an_index_too_big_for_the_collection_names_the_field(beir_dir, tmp_path):  # noqa: F811
    recipe = _vq_recipe(beir_dir, tmp_path, student={**STUDENT, "nlist": 100})
    with pytest.raises(RecipeError, match="student.*nlist"):
        TASKS.get("vq_index")(recipe).build_student()
    recipe = _vq_recipe(beir_dir, tmp_path, student={**STUDENT, "m": 7})
    with pytest.raises(RecipeError, match="divisible"):
        TASKS.get("vq_index")(recipe).build_student()
