"""Tasks composed of parts (kdforge.tasks.parts): each part meets its contract, tasks share parts, and no
task reuses another task by subclassing it.

Building a task loads nothing (its parts load models and data when first asked), so these tests are quick.
"""

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score

from kdforge.checks import load_recipe
from kdforge.models.mlp import MLPClassifier
from kdforge.tasks import TASKS
from kdforge.tasks.base import Task
from kdforge.tasks.classifier_eval import ClassificationEvaluator
from kdforge.tasks.encoder_data import QueryCandidates, RankingPairs, UnlabeledTexts
from kdforge.tasks.encoders import SentenceEncoderFamily
from kdforge.tasks.feature_data import FeatureTable
from kdforge.tasks.ivfpq_family import IVFPQFamily
from kdforge.tasks.lm_data import LMData
from kdforge.tasks.lm_eval import LMEvaluator
from kdforge.tasks.lm_family import CausalLMFamily
from kdforge.tasks.mlp_family import MLPFamily
from kdforge.tasks.parts import ComposedTask, DataSource, Evaluator, ModelFamily
from kdforge.tasks.retrieval import RetrievalEvaluator
from kdforge.tasks.sparse_family import SparseEncoderFamily
from kdforge.tasks.text_classifier_family import TextClassifierFamily
from kdforge.tasks.text_data import LabelledSet, LabelledTextSource
from test_sparse_retriever import _sparse_recipe
from test_tasks_causal_lm import lm_recipe
from test_tasks_encoders import MINILM_TERMS, _recipe, beir_dir  # noqa: F401  (beir_dir is a fixture)
from test_vq_index import _vq_recipe

#: task -> (family, data source, evaluator) classes it is wired from
WIRING = {
    "embedding": (SentenceEncoderFamily, UnlabeledTexts, RetrievalEvaluator),
    "ranking": (SentenceEncoderFamily, RankingPairs, RetrievalEvaluator),
    "sparse_retriever": (SparseEncoderFamily, RankingPairs, RetrievalEvaluator),
    "vq_index": (IVFPQFamily, QueryCandidates, RetrievalEvaluator),
    "causal_lm": (CausalLMFamily, LMData, LMEvaluator),
}
#: the classifiers share one evaluator class
CLASSIFIER_WIRING = {
    "classification": (MLPFamily, FeatureTable, ClassificationEvaluator),
    "text_classification": (TextClassifierFamily, LabelledTextSource, ClassificationEvaluator),
}


@pytest.fixture
def tasks(beir_dir, tmp_path):  # noqa: F811
    recipes = {
        "embedding": _recipe("embedding", beir_dir, tmp_path, MINILM_TERMS[:1]),
        "ranking": _recipe("ranking", beir_dir, tmp_path, [{"loss": "margin_mse", "field": "scores"}]),
        "sparse_retriever": _sparse_recipe(beir_dir, tmp_path),
        "vq_index": _vq_recipe(beir_dir, tmp_path),
        "causal_lm": lm_recipe(tmp_path / "lm", tmp_path / "teacher", tmp_path / "text.txt"),
    }
    return {name: TASKS.get(name)(recipe) for name, recipe in recipes.items()}


@pytest.fixture
def classifiers():
    recipes = {"classification": load_recipe("digits_kd"), "text_classification": load_recipe("text_teacher_sst2")}
    return {name: TASKS.get(name)(recipe) for name, recipe in recipes.items()}


def test_each_part_meets_its_protocol(tasks):
    for name, task in tasks.items():
        assert isinstance(task.family, ModelFamily), name
        assert isinstance(task.data, DataSource), name
        assert isinstance(task.evaluator, Evaluator), name


def test_each_classifier_part_meets_its_protocol(classifiers):
    for name, task in classifiers.items():
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
    encoder_tasks = [task for name, task in tasks.items() if name != "causal_lm"]
    assert len({type(task.evaluator) for task in encoder_tasks}) == 1
    # the families that are not sentence encoders run their teachers through one, held, not inherited
    assert type(tasks["sparse_retriever"].family.dense) is SentenceEncoderFamily
    assert type(tasks["vq_index"].family.encoders) is SentenceEncoderFamily
    # the pair data mines with the family's sentence encoders, and reads the sparse student's tokens
    assert tasks["ranking"].data.encoders is tasks["ranking"].family
    assert tasks["sparse_retriever"].data.encoders is tasks["sparse_retriever"].family.dense


def test_the_classifiers_share_the_evaluator_class(classifiers):
    for name, (family, data, evaluator) in CLASSIFIER_WIRING.items():
        task = classifiers[name]
        assert isinstance(task, ComposedTask), name
        assert (type(task.family), type(task.data), type(task.evaluator)) == (family, data, evaluator), name
    assert type(classifiers["classification"].evaluator) is type(classifiers["text_classification"].evaluator)
    # each evaluator reads its own family's logits and its own data source's labels
    for task in classifiers.values():
        assert task.evaluator.logits == task.family.logits and task.evaluator.labels == task.data.labels
    assert classifiers["classification"].family.data is classifiers["classification"].data


def test_the_classification_evaluator_scores_the_familys_logits_against_the_datas_labels(classifiers):
    task = classifiers["classification"]
    test = task.splits().test
    torch.manual_seed(0)
    model = MLPClassifier(task.in_features, [16], task.num_classes)
    evaluation = task.evaluate(model, test)
    y_true = np.array([int(test[i]["labels"]) for i in range(len(test))])
    with torch.no_grad():
        logits = model(torch.stack([test[i]["inputs"] for i in range(len(test))]))
    assert torch.allclose(evaluation.logits, logits, atol=1e-6)
    y_pred = evaluation.logits.argmax(-1).numpy()
    assert evaluation.metrics == {
        "accuracy": accuracy_score(y_true, y_pred),
        "macro_f1": f1_score(y_true, y_pred, average="macro", zero_division=0),
    }
    assert task.evaluator.primary_metric == "accuracy" and task.evaluator.higher_is_better


def test_the_labelled_texts_capability_is_the_parts(classifiers):
    """labelled_texts promises class_names, labelled_texts, dataset_of, task_description (the data source's)
    and probabilities (softmax of the family's logits)."""
    task = classifiers["text_classification"]
    assert "labelled_texts" in task.capabilities
    task.data.__dict__["class_names"] = ["negative", "positive"]  # what the cached property holds once read
    assert task.class_names == ["negative", "positive"] and task.family.class_names() == ["negative", "positive"]
    examples = task.labelled_texts(LabelledSet(["a fine film", "dull"], [1, 0]))
    assert [(e.text, e.label) for e in examples] == [("a fine film", 1), ("dull", 0)]
    again = task.dataset_of(examples)
    assert [again[i] for i in range(len(again))] == [{"text": "a fine film", "label": 1}, {"text": "dull", "label": 0}]
    assert "sentiment" in task.task_description()
    task.family.logits = lambda model, dataset: torch.tensor([[0.0, 0.0]] * len(dataset))
    np.testing.assert_allclose(task.probabilities(None, ["x", "y"]), [[0.5, 0.5], [0.5, 0.5]])


def _check_class_attributes(tasks):
    for name, task in tasks.items():
        cls = type(task)
        assert cls.primary_metric == task.evaluator.primary_metric, name
        assert cls.higher_is_better == task.evaluator.higher_is_better, name
        assert cls.throughput_unit == task.family.throughput_unit, name
        assert cls.load_hint == task.family.load_hint, name
        assert cls.card_library == task.family.card_library, name


def test_class_attributes_agree_with_the_parts(tasks, classifiers):
    """What recipe checks and reports read on the class is what the parts say."""
    _check_class_attributes(tasks)
    _check_class_attributes(classifiers)


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


def test_the_causal_lm_parts_share_one_tokenizer_and_the_writes_text_capability_is_theirs(tasks):
    """writes_text promises tokenizer, pad_id, stop_ids, max_length, kinds, use_responses and
    monitor_teacher_hacking on the task: they are the family's, the data source's and the evaluator's."""
    task = tasks["causal_lm"]
    assert "writes_text" in task.capabilities
    assert task.data.family is task.family and task.evaluator.family is task.family
    assert task.evaluator.data is task.data
    tokenizer = object()
    task.family.__dict__["tokenizer"] = tokenizer  # what the cached property would hold once loaded
    task.family.__dict__["pad_id"] = 7
    assert task.tokenizer is tokenizer and task.pad_id == 7
    assert task.max_length == task.data_cfg.max_length == 16
    assert task.kinds == task.data.kinds == ()
    source = object()
    task.data.source = None
    task.use_responses(source)  # type: ignore[arg-type]
    assert task.data.source is source
    settings = object()
    task.monitor_teacher_hacking(settings, "methods[0]")  # type: ignore[arg-type]
    assert (task.evaluator.monitor, task.evaluator.monitor_where) == (settings, "methods[0]")
    # the family checks vocabularies against the data's tokens, and times batches collated as training's
    assert task.family.collate == task.data.collate
    task.data.__dict__["largest_token_id"] = 41
    assert task.family.largest_token_id() == 41
