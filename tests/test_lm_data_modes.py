"""Causal-LM data modes: teacher-written data, fresh answers per epoch, distilling step-by-step, and the
teacher-hacking monitor (on-policy batches, GKD, are a method: tests/methods/test_on_policy.py)."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import crash_at_step
from kdforge.data.generate import GenerationStore, sample_continuations
from kdforge.errors import RecipeError
from kdforge.eval.hacking import detect_teacher_hacking
from kdforge.models.hf_causal_lm import load_causal_lm
from kdforge.runner import run_recipe
from kdforge.tasks import lm_generated
from kdforge.tasks.commands import write_recipe_caches
from kdforge.tasks.lm_generated import split_rationale
from test_tasks_causal_lm import lm_recipe, task_of, write_jsonl
from tiny_lm import save_llama

PROMPTS = [f"To be or not {i}, that is the question" for i in range(40)]


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    records = [{"prompt": p, "response": "yes" if i % 2 else "no, not at all"} for i, p in enumerate(PROMPTS)]
    return write_jsonl(tmp_path / "pairs.jsonl", records)


def mode_recipe(tmp_path, teacher_ref, path, mode, *overrides, **sections):
    return lm_recipe(
        tmp_path / mode,
        teacher_ref,
        path,
        "data.format=jsonl",
        f"data.mode={mode}",
        "data.max_length=32",
        "data.generation.max_new_tokens=10",
        *overrides,
        **sections,
    )


def answers_recipe(tmp_path, teacher_ref, path, *overrides, **sections):
    """The file's own answers (offline), no baseline: the runs of the mask and monitor tests."""
    return lm_recipe(
        tmp_path,
        teacher_ref,
        path,
        "data.format=jsonl",
        "data.max_length=40",
        "evaluation.baseline=false",
        *overrides,
        **sections,
    )


def responses_of(task, dataset) -> list[str]:
    batch = task.collate([dataset[i] for i in range(len(dataset))])
    return task._references(batch)


# ----- sampling and the generation store ----------------------------------------------


def test_sampling_is_seeded_stops_at_a_stop_token_and_leaves_the_global_rng_alone(tiny_lm_teacher):
    model = load_causal_lm(str(tiny_lm_teacher), field="t", fresh=True)
    prompts = [[2, 10, 11, 12], [2, 20]]
    before = torch.get_rng_state()
    first = sample_continuations(model, prompts, pad_id=1, stop_ids=[], max_new_tokens=8, temperature=1.0, seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    again = sample_continuations(model, prompts, pad_id=1, stop_ids=[], max_new_tokens=8, temperature=1.0, seed=3)
    other = sample_continuations(model, prompts, pad_id=1, stop_ids=[], max_new_tokens=8, temperature=1.0, seed=4)
    assert first == again and first != other and all(len(c) == 8 for c in first)
    stop = first[0][2]
    cut = sample_continuations(model, prompts, pad_id=1, stop_ids=[stop], max_new_tokens=8, temperature=1.0, seed=3)
    assert cut[0] == first[0][: first[0].index(stop) + 1]
    # a left-padded prompt is continued as if it were alone
    alone = sample_continuations(model, prompts[1:], pad_id=1, stop_ids=[], max_new_tokens=8, temperature=0.0)
    together = sample_continuations(model, prompts, pad_id=1, stop_ids=[], max_new_tokens=8, temperature=0.0)
    assert together[1] == alone[0]


def test_an_interrupted_generation_resumes_with_whole_batches_and_the_same_records(tmp_path):
    calls = []

    def make_batch(start, stop):
        calls.append((start, stop))
        return [{"response": f"answer {i}"} for i in range(start, stop)]

    store = GenerationStore(tmp_path, {"teacher": "x"})
    expected = store.build(7, make_batch, batch_size=3, description="d")
    assert [r["response"] for r in expected] == [f"answer {i}" for i in range(7)]
    assert store.exists() and store.read() == expected

    torn = GenerationStore(tmp_path, {"teacher": "y"})
    lines = [json.dumps({"response": f"answer {i}"}) for i in range(4)]
    torn._partial.write_text("\n".join(lines) + '\n{"respo')  # killed while writing batch 2
    calls.clear()
    assert torn.build(7, make_batch, batch_size=3, description="d") == expected
    assert calls == [(3, 6), (6, 7)]  # the half-written batch is written again, from its start
    calls.clear()
    assert GenerationStore(tmp_path, {"teacher": "y"}).build(7, make_batch, batch_size=3, description="d") == expected
    assert calls == []  # stored: nothing generated again


# ----- teacher_generated ----------------------------------------------------------------


def test_teacher_generated_data_is_the_teachers_answers_with_prompts_masked(tmp_path, tiny_lm_teacher, prompts_file):
    # room for the answers re-tokenized: a random teacher's bytes may take more tokens as text
    recipe = mode_recipe(tmp_path, tiny_lm_teacher, prompts_file, "teacher_generated", "data.max_length=96")
    task = task_of(recipe)
    splits = task.splits()
    store_files = [f for f in task.data_files() if f.suffix == ".jsonl" and f != prompts_file]
    assert len(store_files) == 1
    stored = [json.loads(line)["response"] for line in store_files[0].read_text().splitlines()]
    assert len(stored) == len(splits.train) + len(splits.test)
    # every training example = the prompt (not learned) + the teacher's answer (learned)
    example = splits.train[0]
    prompt_length = int(example.counted.float().argmax())
    text = task.tokenizer.decode(example.input_ids[:prompt_length])
    assert any(p in text for p in PROMPTS) and "<|assistant|>" in text
    assert not example.counted[:prompt_length].any() and example.counted[prompt_length:].all()
    learned = [" ".join(r.split()) for r in responses_of(task, splits.train)]
    assert all(" ".join(r.split()) in learned for r in stored[: len(splits.train)] if r)

    # a second task (a later run, kdforge cache) reads them back instead of generating
    def no_generation(*args, **kwargs):
        raise AssertionError("generated again")

    lm_generated.sample_continuations, saved = no_generation, lm_generated.sample_continuations
    try:
        again = task_of(recipe).splits()
    finally:
        lm_generated.sample_continuations = saved
    assert [torch.equal(a.input_ids, b.input_ids) for a, b in zip(again.train, splits.train)] == [True] * len(
        splits.train
    )


def test_teacher_generated_answers_cached_with_top_k_train_a_student(
    tmp_path, tiny_lm_teacher, prompts_file, unchanged
):
    cache = tmp_path / "cache"
    teacher = {"signal": "cache", "path": str(cache), "model": str(tiny_lm_teacher), "k": 8}
    recipe = mode_recipe(tmp_path, None, prompts_file, "teacher_generated", teacher=teacher)
    ((_, manifest),) = write_recipe_caches(recipe)
    assert manifest.examples == len(task_of(recipe).splits().train)
    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    student = report["runs"][0]["models"]["student"]
    assert student["train"]["data_mode"] == "teacher_generated" and student["metrics"]["perplexity"] > 1
    assert report["throughput_unit"] == "tokens/s"
    samples = report["runs"][0]["samples"]
    assert len(samples) == 3 and set(samples[0]) == {"prompt", "reference", "teacher", "student", "baseline"}
    html = (recipe.run_dir / "report.html").read_text()
    assert "Sample generations" in html and "tokens/s" in html


def test_modes_that_write_text_during_the_run_refuse_a_cached_teacher(tmp_path, tiny_lm_teacher, pairs_file):
    teacher = {"signal": "cache", "path": str(tmp_path / "c"), "model": str(tiny_lm_teacher)}
    with pytest.raises(RecipeError, match="teacher.signal: data.mode online_generation"):
        task_of(mode_recipe(tmp_path, None, pairs_file, "online_generation", teacher=teacher))


@pytest.mark.parametrize("mode", ["teacher_generated", "online_generation"])
def test_modes_that_answer_prompts_need_jsonl_prompts(tmp_path, tiny_lm_teacher, mode):
    with pytest.raises(RecipeError, match="format: jsonl"):
        lm_recipe(tmp_path, tiny_lm_teacher, tmp_path / "t.txt", f"data.mode={mode}")


# ----- online_generation ---------------------------------------------------------------


def test_online_generation_writes_fresh_answers_each_epoch_and_resumes_to_the_same_run(
    tmp_path, tiny_lm_teacher, prompts_file, monkeypatch, unchanged
):
    # 36 training prompts, 8 per batch: 5 batches an epoch, 12 steps = epochs 0, 1 and 2
    args = ("evaluation.baseline=false", "training.steps=12", "training.checkpoint_every=4")
    recipe = mode_recipe(tmp_path, tiny_lm_teacher, prompts_file, "online_generation", *args)
    reference = run_recipe(recipe)
    unchanged(recipe.run_dir, reference)
    store = Path(tmp_path / "kdforge-cache" / "generations")
    keys = [json.loads(p.read_text()) for p in store.glob("*.key.json")]
    assert sorted(k["purpose"] for k in keys) == ["epoch-1", "epoch-2", "responses"]
    task = task_of(recipe)
    train = task.splits().train
    epochs = []
    for epoch in range(3):
        train.set_epoch(epoch)
        epochs.append(responses_of(task, train))
    assert epochs[0] != epochs[1] != epochs[2]  # fresh answers...
    assert [len(e) for e in epochs] == [36, 36, 36]  # ...to the same prompts

    crashed = mode_recipe(tmp_path / "again", tiny_lm_teacher, prompts_file, "online_generation", *args)
    crash_at_step(crashed, 7, monkeypatch)  # in epoch 1
    resumed = run_recipe(crashed, resume=True)
    student = resumed["runs"][0]["models"]["student"]
    assert student["train"]["resumed_from"] == 4
    assert student["metrics"] == reference["runs"][0]["models"]["student"]["metrics"]


# ----- distilling step-by-step --------------------------------------------------------------


def test_a_step_by_step_answer_is_split_at_the_last_answer_line():
    assert split_rationale("Sheep eat grass, so yes.\nAnswer: yes") == ("Sheep eat grass, so yes.", "yes")
    assert split_rationale("a: b. answer: first\nANSWER:  no \nmore") == ("a: b. answer: first", "no")
    assert split_rationale("no answer line here") == ("no answer line here", None)
    assert split_rationale("Answer:") == ("", None)


def test_step_by_step_trains_two_prefixed_tasks_and_evaluates_only_the_label_task(
    tmp_path, tiny_lm_teacher, prompts_file, monkeypatch, unchanged
):
    def teacher_says(self, prompt_ids, *, purpose, description):
        return [f"because reason {i}. Answer: {'yes' if i % 2 else 'no'}" for i in range(len(prompt_ids))]

    monkeypatch.setattr(lm_generated.ResponseWriter, "responses", teacher_says)
    objective = [
        {"loss": "cross_entropy", "mask": "label_mask", "name": "label"},
        {"loss": "cross_entropy", "mask": "rationale_mask", "weight": 0.5, "name": "rationale"},
    ]
    recipe = lm_recipe(
        tmp_path,
        tiny_lm_teacher,
        prompts_file,
        "data.format=jsonl",
        "data.max_length=64",
        "data.step_by_step={}",
        objective=objective,
    )
    task = task_of(recipe)
    splits = task.splits()
    kinds = [e.kind for e in splits.train]
    assert kinds.count("label") == kinds.count("rationale") == 36
    assert {e.kind for e in splits.test} == {"label"}
    batch = task.collate([splits.train[0], splits.train[36]])
    assert batch["label_mask"][0].any() and not batch["label_mask"][1].any()
    assert batch["rationale_mask"][1].any() and not batch["rationale_mask"][0].any()
    assert torch.equal(batch["label_mask"] | batch["rationale_mask"], batch["loss_mask"])
    texts = task.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert texts[0].startswith("label: To be") and texts[1].startswith("rationale: To be")
    assert task._references(batch)[0] in ("yes", "no") and task._references(batch)[1].startswith("because reason")

    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    student = report["runs"][0]["models"]["student"]
    assert set(student["train"]["final_terms"]) == {"label", "rationale"}
    assert 0 <= student["metrics"]["answer_accuracy"] <= 1
    assert student["train"]["step_by_step"] == {"written": 40, "usable": 40}
    assert task.baseline_objective()[0].mask == "label_mask"

    # answer_accuracy compares greedy answers with the references, spaces and case aside
    def answers(model, batch, max_new_tokens):
        references = task._references(batch)
        return references, [f"  {r.upper()} " if i % 2 else r for i, r in enumerate(references)]

    model = SimpleNamespace(config=SimpleNamespace(vocab_size=len(task.tokenizer)))  # only its size is read
    monkeypatch.setattr(task, "_greedy", answers)
    assert task._answer_accuracy(model, splits.test) == 1.0
    monkeypatch.setattr(task, "_greedy", lambda model, batch, n: ([], ["maybe"] * len(batch["labels"])))
    assert task._answer_accuracy(model, splits.test) == 0.0


def test_a_mask_the_batch_lacks_is_a_recipe_error_naming_the_term(tmp_path, tiny_lm_teacher, pairs_file):
    recipe = answers_recipe(
        tmp_path,
        tiny_lm_teacher,
        pairs_file,
        objective=[{"loss": "cross_entropy", "mask": "label_mask"}],
    )
    with pytest.raises(RecipeError, match=r"objective\[0\]\.mask: the batch has no 'label_mask'"):
        run_recipe(recipe)


# ----- the teacher-hacking monitor ------------------------------------------------------


def _records(proxy, golden):
    return [
        {"step": 10 * (i + 1), "eval": {"proxy_kl": p, "golden_kl": g}} for i, (p, g) in enumerate(zip(proxy, golden))
    ]


def test_the_monitor_flags_a_constructed_hacking_case_and_not_a_healthy_one():
    hacking = detect_teacher_hacking(
        _records([1.0, 0.8, 0.6, 0.5, 0.4, 0.35], [2.0, 1.8, 1.7, 1.75, 1.85, 1.95]),
        proxy="proxy_kl",
        golden="golden_kl",
    )
    assert hacking["flagged"] and hacking["golden_best_step"] == 30
    assert hacking["proxy_change"] < 0 < hacking["golden_change"]
    healthy = detect_teacher_hacking(
        _records([1.0, 0.8, 0.6, 0.5, 0.4, 0.35], [2.0, 1.8, 1.7, 1.65, 1.6, 1.58]),
        proxy="proxy_kl",
        golden="golden_kl",
    )
    assert not healthy["flagged"]
    # both worsen together (overfitting, not hacking); golden noise inside the tolerance
    both = detect_teacher_hacking(
        _records([0.5, 0.4, 0.5, 0.6], [2.0, 1.8, 1.9, 2.0]), proxy="proxy_kl", golden="golden_kl"
    )
    noise = detect_teacher_hacking(
        _records([1.0, 0.8, 0.6, 0.5], [2.0, 1.8, 1.801, 1.802]), proxy="proxy_kl", golden="golden_kl"
    )
    assert not both["flagged"] and not noise["flagged"]
    short = detect_teacher_hacking(_records([1.0, 0.8], [2.0, 2.1]), proxy="proxy_kl", golden="golden_kl")
    assert not short["flagged"] and "fewer than" in short["reason"]


def test_a_run_with_the_monitor_logs_proxy_and_golden_and_reports_them(
    tmp_path, tiny_lm_teacher, lm_tokenizer, pairs_file, unchanged
):
    golden = save_llama(tmp_path / "golden", lm_tokenizer, layers=2)
    recipe = answers_recipe(
        tmp_path,
        tiny_lm_teacher,
        pairs_file,
        f"data.monitor={{golden: {golden}, examples: 4}}",
        "training.eval_every=1",
        "training.steps=5",
    )
    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    models = report["runs"][0]["models"]
    hack = models["student"]["train"]["teacher_hacking"]
    # every eval_every steps, and once more at the end
    assert hack["steps"] == [1, 2, 3, 4, 5] and len(hack["proxy_values"]) == len(hack["golden_values"]) == 5
    assert all(v > 0 for v in hack["proxy_values"] + hack["golden_values"])
    assert "proxy_kl" in models["student"]["metrics"] and "proxy_kl" not in models["teacher"]["metrics"]
    html = (recipe.run_dir / "report.html").read_text()
    assert "Teacher-hacking monitor" in html


def test_the_monitor_can_score_golden_written_answers_instead_of_a_golden_model(
    tmp_path, tiny_lm_teacher, pairs_file, unchanged
):
    golden_data = write_jsonl(tmp_path / "golden.jsonl", [{"prompt": "To be", "response": "or not to be"}] * 3)
    recipe = answers_recipe(
        tmp_path,
        tiny_lm_teacher,
        pairs_file,
        f"data.monitor={{golden_data: {golden_data}}}",
        "training.eval_every=2",
    )
    report = run_recipe(recipe)
    unchanged(recipe.run_dir, report)
    hack = report["runs"][0]["models"]["student"]["train"]["teacher_hacking"]
    assert hack["golden"] == "golden_nll" and hack["steps"] == [2, 4, 6]
    with pytest.raises(RecipeError, match="exactly one of golden"):
        lm_recipe(tmp_path, tiny_lm_teacher, pairs_file, "data.format=jsonl", "data.monitor={}")
