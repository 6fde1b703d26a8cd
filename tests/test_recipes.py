"""Every bundled recipe runs end to end at tiny size."""

from pathlib import Path

import pytest

from conftest import SHARED_DATA, tiny
from kdforge.commands import write_recipe_caches
from kdforge.data.features import MNIST_IMAGES
from kdforge.recipe import bundled_recipes, read_raw
from kdforge.runner import run_recipe


def _recipes_of(task: str) -> list[str]:
    return [name for name, path in sorted(bundled_recipes().items()) if read_raw(path)["task"] == task]


#: causal-LM recipes at tiny size: a few short blocks of text, a small evaluation, half the steps
LM_TINY = [
    "data.max_length=32",
    "data.train_limit=48",
    "data.eval_limit=8",
    "training.steps=6",
    "training.batch_size=4",
]


def _cached_where_asked(name: str, tmp_path) -> list[str]:
    """A recipe whose teacher is a cache gets one in the test's folder, written first (as the demo does)."""
    return (
        [f"teacher.path={tmp_path / 'cache'}"]
        if read_raw(bundled_recipes()[name])["teacher"].get("signal") == "cache"
        else []
    )


def test_every_bundled_recipe_is_run_by_a_test_below():
    tested = (
        "classification",
        "causal_lm",
        "embedding",
        "ranking",
        "sparse_retriever",
        "vq_index",
        "text_classification",
    )
    assert set(bundled_recipes()) == {name for task in tested for name in _recipes_of(task)}


def _on_mnist(name: str) -> bool:
    return read_raw(bundled_recipes()[name])["data"].get("dataset") == "mnist"


@pytest.mark.parametrize("name", [n for n in _recipes_of("classification") if not _on_mnist(n)])
def test_bundled_recipe_runs_at_tiny_size(name, tmp_path, digits_teacher, unchanged):
    recipe = tiny(name, tmp_path)
    extra = [f"teacher.model={digits_teacher}"] if recipe.teacher else []
    recipe = tiny(name, tmp_path, *extra)
    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    assert (recipe.run_dir / "report.html").is_file()
    assert (recipe.run_dir / "model" / "README.md").is_file()
    assert report["summary"]["student"]["metrics"]["accuracy"]["n"] == 1


@pytest.fixture(scope="module")
def mnist_teacher(tmp_path_factory) -> Path:
    """A small MNIST teacher trained for a few steps (once per module); returns its model folder."""
    if not (SHARED_DATA / "mnist" / MNIST_IMAGES).is_file():
        pytest.skip(f"MNIST is not at {SHARED_DATA}/mnist (set KDFORGE_DATA_DIR)")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDFORGE_DATA_DIR", str(SHARED_DATA.resolve()))
        recipe = tiny("mnist_teacher", tmp_path_factory.mktemp("mnist-teacher"), "student.hidden=[32]")
        run_recipe(recipe)
    return recipe.run_dir / "model"


@pytest.mark.parametrize("name", [n for n in _recipes_of("classification") if _on_mnist(n)])
def test_bundled_mnist_recipe_runs_at_tiny_size(name, tmp_path, mnist_teacher, monkeypatch, unchanged):
    """The recipe as shipped (the teacher's own recipe too), with a small teacher for the KD one."""
    monkeypatch.setenv("KDFORGE_DATA_DIR", str(SHARED_DATA.resolve()))
    recipe = tiny(name, tmp_path)
    recipe = tiny(name, tmp_path, f"teacher.model={mnist_teacher}") if recipe.teacher else recipe
    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    models = report["runs"][0]["models"]
    assert set(models) == ({"teacher", "student", "baseline"} if recipe.teacher else {"student"})
    assert models["student"]["train"]["steps"] == 12
    assert (recipe.run_dir / "model" / "README.md").is_file()


@pytest.mark.parametrize("name", _recipes_of("causal_lm"))
def test_bundled_lm_recipe_runs_with_a_tiny_gguf_teacher(name, tmp_path, tiny_gguf_teacher, shakespeare_dir, unchanged):
    """The recipe as shipped, with a 4-layer GGUF Llama standing in for its teacher."""
    teacher = [f"teacher.model={tiny_gguf_teacher}", "student.from_teacher={layers: [0, 3]}"]
    if read_raw(bundled_recipes()[name])["student"].get("prune"):  # the tiny teacher's MLP has 64 channels
        teacher.append("student.prune={intermediate: 32}")
    recipe = tiny(name, tmp_path, *teacher, *LM_TINY, *_cached_where_asked(name, tmp_path))
    if recipe.teacher.signal == "cache":
        write_recipe_caches(recipe)
    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    assert (recipe.run_dir / "report.html").is_file()
    assert (recipe.run_dir / "model" / "config.json").is_file()
    assert set(report["summary"]) == {"teacher", "student", "baseline"}
    assert report["summary"]["student"]["metrics"]["perplexity"]["n"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", _recipes_of("causal_lm"))
def test_bundled_lm_recipe_runs_with_its_own_teacher_at_tiny_size(name, tmp_path, shakespeare_dir):
    pytest.importorskip("gguf", reason="the recipe's teacher is a GGUF file")
    recipe = tiny(name, tmp_path, *LM_TINY, "evaluation.batch_size=4", *_cached_where_asked(name, tmp_path))
    if recipe.teacher.signal == "cache":
        write_recipe_caches(recipe)
    report = run_recipe(recipe)
    models = report["runs"][0]["models"]
    assert models["teacher"]["metrics"]["perplexity"] < models["baseline"]["metrics"]["perplexity"]
    assert (recipe.run_dir / "model" / "model.safetensors").is_file()


#: encoder recipes at tiny size: SciFact's first texts and queries, short texts, a small collection
ENCODER_TINY = [
    "training.steps=3",
    "training.batch_size=4",
    "data.max_length=32",
    "data.test.query_limit=6",
    "data.test.corpus_limit=40",
    "data.test.latency_queries=2",
    "evaluation.batch_size=32",
]


@pytest.fixture
def scifact_dir(monkeypatch):
    if not (SHARED_DATA / "scifact" / "corpus.jsonl").is_file():
        pytest.skip(f"SciFact is not at {SHARED_DATA}/scifact (set KDFORGE_DATA_DIR)")
    monkeypatch.setenv("KDFORGE_DATA_DIR", str(SHARED_DATA.resolve()))


@pytest.mark.parametrize("name", _recipes_of("embedding"))
def test_bundled_embedding_recipe_runs_at_tiny_size(name, tmp_path, scifact_dir, unchanged):
    extra = ["data.train_limit=12", "data.test.wikiqa_limit=4"]
    recipe = tiny(name, tmp_path, *ENCODER_TINY, *extra)
    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    models = report["runs"][0]["models"]
    assert {"ndcg@10", "recall@100", "mrr@10"} <= set(models["student"]["metrics"])
    assert (tmp_path / name / "model" / "modules.json").is_file()


@pytest.mark.parametrize("name", _recipes_of("sparse_retriever"))
def test_bundled_sparse_retriever_recipe_runs_at_tiny_size(name, tmp_path, scifact_dir, unchanged):
    extra = ["data.query_limit=8", "data.corpus_limit=30", "data.negatives=4", "training.batch_size=2"]
    recipe = tiny(name, tmp_path, *ENCODER_TINY, *extra)
    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    models = report["runs"][0]["models"]
    assert set(models) == {"student", "baseline"}  # an ensemble teacher has no single model to evaluate
    assert {"ndcg@10", "query_ms", "doc_nonzeros", "bytes_per_doc"} <= set(models["student"]["metrics"])
    assert report["teacher_signal"]["members"][1]["model"] == "bm25"


@pytest.mark.parametrize("name", _recipes_of("vq_index"))
def test_bundled_vq_index_recipe_runs_at_tiny_size(name, tmp_path, scifact_dir, unchanged):
    extra = ["student.nlist=4", "student.nbits=4", "data.query_limit=16", "data.document_queries=8", "data.top_k=10"]
    recipe = tiny(name, tmp_path, *ENCODER_TINY, *extra)
    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    models = report["runs"][0]["models"]
    assert set(models) == {"teacher", "student", "baseline"}
    assert models["student"]["metrics"]["code_bytes_per_doc"] == 48 * 4 / 8 + 8
    assert (tmp_path / name / "model" / "index.faiss").is_file()


@pytest.mark.parametrize("name", _recipes_of("ranking"))
def test_bundled_ranking_recipe_runs_at_tiny_size(name, tmp_path, scifact_dir, unchanged):
    extra = ["data.query_limit=8", "data.corpus_limit=30", "data.negatives=4", "data.negatives_per_example=2"]
    recipe = tiny(name, tmp_path, *ENCODER_TINY, *extra)
    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    models = report["runs"][0]["models"]
    assert set(models) == {"teacher", "student", "baseline"}
    assert models["student"]["train"]["steps"] == 3


@pytest.fixture(scope="module")
def sst2_teacher_run(tmp_path_factory) -> Path:
    """The bundled teacher recipe at tiny size (a few steps on 48 sentences); returns its model folder."""
    if not (SHARED_DATA / "sst2" / "train.tsv").is_file():
        pytest.skip(f"SST-2 is not at {SHARED_DATA}/sst2 (set KDFORGE_DATA_DIR)")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KDFORGE_DATA_DIR", str(SHARED_DATA.resolve()))
        recipe = tiny("text_teacher_sst2", tmp_path_factory.mktemp("sst2-teacher"), *TEXT_TINY)
        run_recipe(recipe)
    return recipe.run_dir / "model"


#: text-classification recipes at tiny size: 48 short sentences, small evaluation sets
TEXT_TINY = [
    "training.steps=4",
    "training.batch_size=8",
    "training.eval_every=null",
    "data.train_limit=48",
    "data.validation_limit=16",
    "data.test_limit=24",
    "data.max_length=24",
    "evaluation.batch_size=32",
]


@pytest.mark.parametrize("name", _recipes_of("text_classification"))
def test_bundled_text_classification_recipe_runs_at_tiny_size(name, tmp_path, sst2_teacher_run, monkeypatch, unchanged):
    monkeypatch.setenv("KDFORGE_DATA_DIR", str(SHARED_DATA.resolve()))
    recipe = tiny(name, tmp_path, *TEXT_TINY)
    if recipe.teacher:
        recipe = tiny(name, tmp_path, *TEXT_TINY, f"teacher.model={sst2_teacher_run}")
    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    models = report["runs"][0]["models"]
    assert set(models) == ({"teacher", "student", "baseline"} if recipe.teacher else {"student"})
    assert {"accuracy", "macro_f1"} <= set(models["student"]["metrics"])
    assert (recipe.run_dir / "model" / "classifier.json").is_file()
