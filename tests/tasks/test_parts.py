"""Tasks composed of parts (kdforge.tasks.parts): each part meets its contract, tasks share parts, and no
task reuses another task by subclassing it.

Building a task loads nothing (its parts load models and data when first asked), so these tests are quick.
"""

import pytest

from kdforge.tasks import TASKS
from kdforge.tasks.base import Task
from kdforge.tasks.encoder_data import QueryCandidates, RankingPairs, UnlabeledTexts
from kdforge.tasks.encoders import SentenceEncoderFamily
from kdforge.tasks.ivfpq_family import IVFPQFamily
from kdforge.tasks.parts import ComposedTask, DataSource, Evaluator, ModelFamily
from kdforge.tasks.retrieval import RetrievalEvaluator
from kdforge.tasks.sparse_family import SparseEncoderFamily
from test_sparse_retriever import _sparse_recipe
from test_tasks_encoders import MINILM_TERMS, _recipe, beir_dir  # noqa: F401  (beir_dir is a fixture)
from test_vq_index import _vq_recipe

#: task -> (family, data source, evaluator) classes it is wired from
WIRING = {
    "embedding": (SentenceEncoderFamily, UnlabeledTexts, RetrievalEvaluator),
    "ranking": (SentenceEncoderFamily, RankingPairs, RetrievalEvaluator),
    "sparse_retriever": (SparseEncoderFamily, RankingPairs, RetrievalEvaluator),
    "vq_index": (IVFPQFamily, QueryCandidates, RetrievalEvaluator),
}


@pytest.fixture
def tasks(beir_dir, tmp_path):  # noqa: F811
    recipes = {
        "embedding": _recipe("embedding", beir_dir, tmp_path, MINILM_TERMS[:1]),
        "ranking": _recipe("ranking", beir_dir, tmp_path, [{"loss": "margin_mse", "field": "scores"}]),
        "sparse_retriever": _sparse_recipe(beir_dir, tmp_path),
        "vq_index": _vq_recipe(beir_dir, tmp_path),
    }
    return {name: TASKS.get(name)(recipe) for name, recipe in recipes.items()}


def test_each_part_meets_its_protocol(tasks):
    for name, task in tasks.items():
        assert isinstance(task.family, ModelFamily), name
        assert isinstance(task.data, DataSource), name
        assert isinstance(task.evaluator, Evaluator), name


def test_the_protocols_refuse_what_lacks_their_methods():
    class NotAFamily:
        def load_teacher(self, ref, field="teacher.model"): ...

    assert not isinstance(NotAFamily(), ModelFamily)
    assert not isinstance(NotAFamily(), DataSource)
    assert not isinstance(NotAFamily(), Evaluator)


def test_tasks_are_wired_from_the_shared_parts(tasks):
    for name, (family, data, evaluator) in WIRING.items():
        task = tasks[name]
        assert isinstance(task, ComposedTask), name
        assert (type(task.family), type(task.data), type(task.evaluator)) == (family, data, evaluator), name
    # one sentence-encoder family for embedding and ranking, one data source for ranking and sparse_retriever
    assert type(tasks["embedding"].family) is type(tasks["ranking"].family)
    assert type(tasks["ranking"].data) is type(tasks["sparse_retriever"].data)
    assert len({type(task.evaluator) for task in tasks.values()}) == 1
    # the families that are not sentence encoders run their teachers through one, held, not inherited
    assert type(tasks["sparse_retriever"].family.dense) is SentenceEncoderFamily
    assert type(tasks["vq_index"].family.encoders) is SentenceEncoderFamily
    # the pair data mines with the family's sentence encoders, and reads the sparse student's tokens
    assert tasks["ranking"].data.encoders is tasks["ranking"].family
    assert tasks["sparse_retriever"].data.encoders is tasks["sparse_retriever"].family.dense


def test_class_attributes_agree_with_the_parts(tasks):
    """What recipe checks and reports read on the class is what the parts say."""
    for name, task in tasks.items():
        cls = type(task)
        assert cls.primary_metric == task.evaluator.primary_metric, name
        assert cls.higher_is_better == task.evaluator.higher_is_better, name
        assert cls.throughput_unit == task.family.throughput_unit, name
        assert cls.load_hint == task.family.load_hint, name
        assert cls.card_library == task.family.card_library, name


def test_the_pair_capability_is_the_data_sources(tasks):
    """has_pairs promises triples and query_clusters(n): both are the ranking-pairs data source's own."""
    for name in ("ranking", "sparse_retriever"):
        task = tasks[name]
        assert "has_pairs" in task.capabilities
        triples = object()
        task.data.__dict__["triples"] = triples  # what the cached property would hold once mined
        task.data.query_clusters = lambda clusters=None: ("clusters", clusters)
        assert task.triples is triples
        assert task.query_clusters(3) == ("clusters", 3)


def test_no_task_subclasses_another_task():
    """Tasks reuse parts by building them: above a task class there are only Task and ComposedTask."""
    for name, cls in TASKS.items():
        tasks_above = [base for base in cls.__mro__[1:] if isinstance(base, type) and issubclass(base, Task)]
        assert set(tasks_above) <= {Task, ComposedTask}, f"{name}: {cls.__name__} subclasses {tasks_above}"
