"""The causal_lm task: data, batches, students cut from the teacher, evaluation, saving, whole runs."""

import json
from pathlib import Path

import pytest
import torch

from conftest import crash_at_step
from kdforge.checks import parse_recipe
from kdforge.commands import build_task, write_recipe_caches
from kdforge.data.lm import collate_causal, packed_text_blocks, prompt_response_examples
from kdforge.errors import ModelRefError, RecipeError
from kdforge.models.from_teacher import (
    capacity_advice,
    describe_sizes,
    evenly_spaced_layers,
    student_from_teacher,
)
from kdforge.runner import run_recipe
from tiny_lm import TEXT, make_llama, make_tokenizer, save_llama


def lm_recipe(out: Path, teacher_ref: Path | str | None, path: Path | str, *overrides: str, **sections):
    data = {
        "name": "tiny-lm",
        "task": "causal_lm",
        "student": {"from_teacher": {"layers": [0, 3]}},
        "data": {"format": "text", "path": str(path), "max_length": 16},
        "objective": [{"loss": "forward_kl", "weight": 1.0}, {"loss": "cross_entropy", "weight": 0.1}],
        "training": {"lr": 3e-3, "batch_size": 8, "steps": 6, "log_every": 2, "checkpoint_every": 3},
        "evaluation": {"batch_size": 8, "throughput_batches": 1, "throughput_repeats": 1},
        "output": {"dir": str(out)},
        **sections,
    }
    if teacher_ref is not None and "teacher" not in sections:
        data["teacher"] = {"model": str(teacher_ref)}
    return parse_recipe(data, list(overrides))


def task_of(recipe):
    """The recipe's task as a run builds it: set up by the recipe's methods."""
    return build_task(recipe)


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "hamlet.txt"
    path.write_text(TEXT * 4)
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ----- students from the teacher ----------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_a_student_with_every_layer_reproduces_the_teacher_exactly(tied):
    teacher = make_llama(120, layers=3, tied=tied)
    student = student_from_teacher(teacher, [0, 1, 2])
    ids = torch.randint(0, 120, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        assert torch.equal(student(ids, attention_mask=mask).logits, teacher(ids, attention_mask=mask).logits)
    assert (student.lm_head.weight is student.model.embed_tokens.weight) == tied
    assert student.config.tie_word_embeddings == tied


def test_a_student_keeps_the_chosen_layers_in_order_with_embeddings_norm_and_head():
    teacher = make_llama(120, layers=4)
    student = student_from_teacher(teacher, [0, 2, 3])
    assert student.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 4
    for new, old in enumerate([0, 2, 3]):
        for (name, p), (_, q) in zip(
            student.model.layers[new].named_parameters(), teacher.model.layers[old].named_parameters()
        ):
            assert torch.equal(p, q), name
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(student.get_parameter(name), teacher.get_parameter(name))
    assert student.dtype == torch.float32
    # the student is a copy: training it leaves the teacher alone
    assert student.lm_head.weight.data_ptr() != teacher.lm_head.weight.data_ptr()


def test_the_kv_cache_works_in_a_student_cut_from_later_layers():
    teacher = make_llama(120, layers=4)
    student = student_from_teacher(teacher, [1, 3])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]
    prompt = torch.randint(0, 120, (1, 5))
    cached = student.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = student.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_evenly_spaced_layers_keep_the_first_and_the_last():
    assert evenly_spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    assert evenly_spaced_layers(4, 2) == [0, 3]
    assert evenly_spaced_layers(4, 4) == [0, 1, 2, 3]
    assert evenly_spaced_layers(12, 3) == [0, 6, 11]
    for total, count in [(4, 5), (4, 1)]:
        with pytest.raises(ValueError):
            evenly_spaced_layers(total, count)


def test_bad_layer_choices_are_recipe_errors():
    teacher = make_llama(120, layers=4)
    with pytest.raises(RecipeError, match=r"student.from_teacher.layers: layer 4 does not exist; .* 4 layers \(0-3\)"):
        student_from_teacher(teacher, [0, 4], field="student.from_teacher")
    with pytest.raises(RecipeError, match="must be increasing"):
        student_from_teacher(teacher, [2, 1], field="student.from_teacher")


def test_other_layouts_than_llama_are_refused_clearly():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2))
    with pytest.raises(RecipeError, match=r"GPT2LMHeadModel does not keep its decoder layers at model.model.layers"):
        student_from_teacher(gpt2, [0], field="student.from_teacher")


def test_sizes_and_capacity_gap_advice():
    assert capacity_advice(250, 100) is None
    assert "larger student" in capacity_advice(1000, 100)
    assert "smaller student" in capacity_advice(120, 100)
    teacher = make_llama(120, layers=4)
    lines = describe_sizes(teacher, student_from_teacher(teacher, [0, 1, 3]), [0, 1, 3])
    assert lines[0].startswith("student: 3 of 4 teacher layers [0, 1, 3]: ")
    assert lines[1].startswith("advice: the teacher is 1.3x the student") and "smaller student" in lines[1]
    assert len(describe_sizes(teacher, student_from_teacher(teacher, [0]), [0])) == 1  # 2.7x: no advice


# ----- data and batches ---------------------------------------------------------------


def test_text_is_tokenized_once_and_packed_into_full_blocks(text_file, lm_tokenizer):
    blocks = packed_text_blocks(text_file, lm_tokenizer, 16)
    ids = lm_tokenizer(text_file.read_text(), add_special_tokens=False)["input_ids"]
    assert len(blocks) == len(ids) // 16 and all(len(b.input_ids) == 16 for b in blocks)
    assert torch.cat([b.input_ids for b in blocks]).tolist() == ids[: len(blocks) * 16]  # the short tail is dropped
    batch = collate_causal(blocks[:3], pad_id=1)
    assert batch["input_ids"].shape == (3, 16) and batch["attention_mask"].all()
    assert batch["labels"].shape == batch["loss_mask"].shape == batch["position_mask"].shape == (3, 15)
    assert torch.equal(batch["labels"], batch["input_ids"][:, 1:]) and batch["loss_mask"].all()


def test_collate_pads_on_the_right_and_masks_padding(lm_tokenizer, text_file):
    short, long = packed_text_blocks(text_file, lm_tokenizer, 16)[:2]
    short.input_ids, short.counted = short.input_ids[:5], short.counted[:5]
    batch = collate_causal([short, long], pad_id=1)
    assert batch["input_ids"][0, 5:].eq(1).all() and batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 11
    assert batch["position_mask"][0].tolist() == [True] * 4 + [False] * 11
    assert batch["labels"][0, :4].tolist() == short.input_ids[1:].tolist() and batch["labels"][0, 4:].eq(-100).all()
    assert torch.equal(batch["loss_mask"], batch["labels"] != -100)


def test_prompt_tokens_are_masked_out_token_by_token_with_a_chat_template(tmp_path, lm_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "To be?", "response": "Or not to be."}])
    (example,), dropped = prompt_response_examples(path, lm_tokenizer, 64)
    assert dropped == 0
    tokens = lm_tokenizer.convert_ids_to_tokens(example.input_ids.tolist())
    assert lm_tokenizer.decode(example.input_ids) == "<|user|>To be?<|end|><|assistant|>Or not to be.<|end|>"
    start = tokens.index("<|assistant|>") + 1
    response = lm_tokenizer("Or not to be.", add_special_tokens=False)["input_ids"]
    assert example.input_ids[start:].tolist() == [*response, lm_tokenizer.convert_tokens_to_ids("<|end|>")]
    assert example.counted.tolist() == [False] * start + [True] * (len(tokens) - start)

    batch = collate_causal([example], pad_id=1)
    labels = batch["labels"][0].tolist()
    for j, label in enumerate(labels):  # the output at position j predicts token j + 1
        expected = example.input_ids[j + 1].item() if j + 1 >= start else -100
        assert label == expected, (j, tokens[j + 1])
    assert batch["loss_mask"][0].tolist() == [j + 1 >= start for j in range(len(labels))]
    assert batch["position_mask"][0].all()


def test_without_a_chat_template_prompt_and_response_are_concatenated(tmp_path):
    tokenizer = make_tokenizer(chat_template=False)
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"q": "To be?", "a": " Or not."}])
    (example,), _ = prompt_response_examples(path, tokenizer, 64, prompt_field="q", response_field="a")
    prompt = tokenizer("To be?", add_special_tokens=False)["input_ids"]
    response = tokenizer(" Or not.", add_special_tokens=False)["input_ids"]
    expected = [tokenizer.bos_token_id, *prompt, *response, tokenizer.eos_token_id]
    assert example.input_ids.tolist() == expected
    assert example.counted.tolist() == [False] * (1 + len(prompt)) + [True] * (len(response) + 1)


def test_a_chat_template_that_fails_is_a_recipe_error(tmp_path):
    tokenizer = make_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('roles must alternate system/user') }}"
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "a", "response": "b"}])
    with pytest.raises(
        RecipeError, match=r"data.chat_template: .*\(roles must alternate .*\); set data.chat_template: false"
    ):
        prompt_response_examples(path, tokenizer, 32)
    (example,), _ = prompt_response_examples(path, tokenizer, 32, chat_template=False)
    assert example.input_ids[0] == tokenizer.bos_token_id


def test_long_examples_are_cut_and_those_left_without_response_dropped(tmp_path, lm_tokenizer):
    records = [
        {"prompt": "To be?", "response": "Or not to be, that is the question."},
        {"prompt": TEXT, "response": "x"},
    ]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    examples, dropped = prompt_response_examples(path, lm_tokenizer, 12)
    assert dropped == 1 and len(examples) == 1 and len(examples[0].input_ids) == 12
    assert examples[0].counted.any()


def test_jsonl_task_splits_shuffle_by_seed_and_keep_response_masks(tmp_path, tiny_lm_teacher):
    records = [{"prompt": f"Line {i}?", "response": f"Answer {i}."} for i in range(20)]
    path = write_jsonl(tmp_path / "qa.jsonl", records)
    recipe = lm_recipe(tmp_path, tiny_lm_teacher, path, "data.format=jsonl", "data.test_fraction=0.2")
    splits = task_of(recipe).splits()
    assert (len(splits.train), len(splits.test)) == (16, 4) and splits.eval is splits.test
    batch = task_of(recipe).collate([splits.train[i] for i in range(4)])
    assert not batch["loss_mask"].all() and batch["loss_mask"].any(-1).all()
    other = task_of(lm_recipe(tmp_path, tiny_lm_teacher, path, "data.format=jsonl", "data.split_seed=1")).splits()
    assert [e.input_ids.tolist() for e in other.test] != [e.input_ids.tolist() for e in splits.test]


def test_text_splits_are_contiguous_with_limits(tmp_path, tiny_lm_teacher, text_file, lm_tokenizer):
    recipe = lm_recipe(
        tmp_path,
        tiny_lm_teacher,
        text_file,
        "data.test_fraction=0.2",
        "data.validation_fraction=0.2",
        "data.train_limit=3",
        "data.eval_limit=2",
    )
    blocks = packed_text_blocks(text_file, lm_tokenizer, 16)
    splits = task_of(recipe).splits()
    n_test = round(len(blocks) * 0.2)
    assert [e.input_ids.tolist() for e in splits.train] == [b.input_ids.tolist() for b in blocks[:3]]
    assert [e.input_ids.tolist() for e in splits.test] == [b.input_ids.tolist() for b in blocks[-n_test:][:2]]
    assert splits.eval_name == "validation" and len(splits.eval) == 2


def test_relative_data_paths_are_found_in_kdforge_data_dir(tmp_path, tiny_lm_teacher, monkeypatch):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "hamlet.txt").write_text(TEXT * 4)
    monkeypatch.setenv("KDFORGE_DATA_DIR", str(tmp_path))
    task = task_of(lm_recipe(tmp_path, tiny_lm_teacher, "corpus/hamlet.txt"))
    assert task.data_files() == [tmp_path / "corpus" / "hamlet.txt"] and len(task.splits().train) > 0


@pytest.mark.parametrize(
    "content, overrides, message",
    [
        (None, [], r"data.path: .*missing.txt does not exist"),
        ("", [], r"data.path: .* is empty"),
        ('{"prompt": "a", "response": "b"}\nnot json\n', ["data.format=jsonl"], r"line 2 is not valid JSON"),
        ('["prompt", "response"]\n', ["data.format=jsonl"], r"line 1 is a JSON list, not an object"),
        (
            '{"prompt": "a", "answer": "b"}\n',
            ["data.format=jsonl"],
            r"data.response_field: .* line 1 has no 'response' field \(it has 'prompt', 'answer'\); set",
        ),
        ('{"prompt": "a", "response": 3}\n', ["data.format=jsonl"], r"'response' is a int, not a string"),
        ('{"prompt": "' + "x " * 80 + '", "response": "b"}\n', ["data.format=jsonl"], r"data.max_length: every"),
        ("To be", [], r"too few to split"),
    ],
)
def test_bad_data_gives_one_line_errors(tmp_path, tiny_lm_teacher, content, overrides, message):
    path = tmp_path / "missing.txt"
    if content is not None:
        path.write_text(content)
    task = task_of(lm_recipe(tmp_path, tiny_lm_teacher, path, *overrides))
    with pytest.raises(RecipeError, match=message) as info:
        task.splits()
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "student, message",
    [
        ({"from_teacher": {"layers": [0], "num_layers": 2}}, "student.from_teacher: give exactly one of layers"),
        ({"from_teacher": {"num_layers": 1}}, r"student.from_teacher.num_layers: must be >= 2"),
        ({"model": "x", "from_teacher": {"num_layers": 2}}, "student: give exactly one of from_teacher"),
        ({}, "student: give exactly one of from_teacher"),
        ({"from_teacher": {"num_layers": 2}, "hidden": [8]}, r"student.hidden: unknown field"),
    ],
)
def test_student_section_errors_name_the_field(tmp_path, tiny_lm_teacher, text_file, student, message):
    with pytest.raises(RecipeError, match=message):
        lm_recipe(tmp_path, tiny_lm_teacher, text_file, student=student)


def test_too_many_layers_for_the_teacher(tmp_path, tiny_lm_teacher, text_file):
    task = task_of(lm_recipe(tmp_path, tiny_lm_teacher, text_file, student={"from_teacher": {"num_layers": 9}}))
    with pytest.raises(RecipeError, match="student.from_teacher.num_layers: 9, but the teacher has 4 layers"):
        task.build_student()


def test_the_student_and_the_baseline_start_from_equal_copies_cut_once(tmp_path, tiny_lm_teacher, text_file, capsys):
    task = task_of(lm_recipe(tmp_path, tiny_lm_teacher, text_file))
    task.splits()
    teacher = task.load_teacher(str(tiny_lm_teacher))
    assert task.load_teacher(str(tiny_lm_teacher)) is teacher  # loaded once while in use
    first, second = task.build_student(), task.build_student()
    assert first is not second
    for (name, p), q in zip(first.named_parameters(), second.parameters()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
    assert capsys.readouterr().err.count("student: 2 of 4 teacher layers [0, 3]") == 1


def test_without_any_local_model_there_is_no_tokenizer(tmp_path, text_file):
    teacher = {"signal": "cache", "path": str(tmp_path / "cache")}
    task = task_of(lm_recipe(tmp_path, None, text_file, teacher=teacher))
    with pytest.raises(RecipeError, match=r"teacher.model: .* tokenizer .* or student.from_teacher.model\)"):
        task.splits()


def test_a_pretrained_student_with_another_tokenizer_is_refused(tmp_path, tiny_lm_teacher, text_file):
    other = make_tokenizer(TEXT.upper(), vocab_size=280)
    student_dir = save_llama(tmp_path / "other", other, layers=2)
    task = task_of(lm_recipe(tmp_path, tiny_lm_teacher, text_file, student={"model": str(student_dir)}))
    message = r"student.model: its tokenizer \(280 tokens\) differs .* cross-tokenizer"
    with pytest.raises(RecipeError, match=message) as e:
        task.splits()
    assert "teacher.model" in str(e.value) and "\n" not in str(e.value)


def test_a_pretrained_student_with_the_same_tokenizer_trains_as_itself(tmp_path, tiny_lm_teacher, text_file):
    student_dir = save_llama(tmp_path / "student", make_tokenizer(), layers=2, seed=3)
    task = task_of(lm_recipe(tmp_path, tiny_lm_teacher, text_file, student={"model": str(student_dir)}))
    task.splits()
    student = task.build_student()
    assert student.config.num_hidden_layers == 2 and all(p.requires_grad for p in student.parameters())
    # a second build is a new model, never one shared with someone else
    assert task.build_student() is not student


def test_a_pretrained_student_must_predict_over_as_many_entries_as_the_teacher(tmp_path, tiny_lm_teacher, text_file):
    padded = tmp_path / "padded"
    make_llama(320, layers=2).save_pretrained(padded)  # same tokenizer, a vocabulary padded to 320
    make_tokenizer().save_pretrained(padded)
    task = task_of(lm_recipe(tmp_path, tiny_lm_teacher, text_file, student={"model": str(padded)}))
    task.splits()
    with pytest.raises(RecipeError, match="student.model: predicts 320 vocabulary entries and teacher.model 300"):
        task.build_student()


def test_a_teacher_that_is_not_a_causal_lm_is_a_model_ref_error(tmp_path, text_file):
    folder = tmp_path / "notamodel"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "no-such-architecture"}')
    task = task_of(lm_recipe(tmp_path, folder, text_file))
    with pytest.raises(ModelRefError, match="teacher.model: .* is not a causal language model transformers can load"):
        task.load_teacher(str(folder))


# ----- adapter, evaluation, speed -----------------------------------------------------


def test_outputs_line_up_with_the_shifted_labels(tmp_path, tiny_lm_teacher, text_file):
    task = task_of(lm_recipe(tmp_path, tiny_lm_teacher, text_file))
    splits = task.splits()
    teacher = task.load_teacher(str(tiny_lm_teacher))
    batch = task.collate([splits.train[i] for i in range(3)])
    out = task.adapter(teacher, batch, frozenset({"logits"}))
    assert out.present() == ["logits"] and out.logits.shape == (3, 15, teacher.config.vocab_size)
    with torch.no_grad():
        full = teacher(batch["input_ids"]).logits
    assert torch.allclose(out.logits, full[:, :-1], atol=1e-6)
    hidden = task.adapter(teacher, batch, frozenset({"hidden", "hidden_states"}))
    assert hidden.present() == ["hidden", "hidden_states"]
    assert len(hidden.hidden_states) == 5 and hidden.hidden_states[0].shape == (3, 15, 32)
    assert hidden.hidden is hidden.hidden_states[-1]


def test_evaluation_gives_perplexity_and_the_first_counted_positions_logits(tmp_path, tiny_lm_teacher, text_file):
    task = task_of(lm_recipe(tmp_path, tiny_lm_teacher, text_file, "data.fidelity_positions=20"))
    splits = task.splits()
    teacher = task.load_teacher(str(tiny_lm_teacher))
    result = task.evaluate(teacher, splits.test)
    batch = task.collate(list(splits.test))
    with torch.no_grad():
        logits = teacher(batch["input_ids"]).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert result.metrics["nll"] == pytest.approx(float(nll), rel=1e-5)
    assert result.metrics["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-5)
    assert result.logits.shape == (20, teacher.config.vocab_size)
    assert torch.allclose(result.logits, logits[batch["loss_mask"]][:20], atol=1e-5)
    assert task.higher_is_better is False and task.primary_metric == "perplexity"


def test_speed_runs_the_model_on_a_batch_of_sequences(tmp_path, tiny_lm_teacher, text_file):
    task = task_of(lm_recipe(tmp_path, tiny_lm_teacher, text_file))
    splits = task.splits()
    teacher = task.load_teacher(str(tiny_lm_teacher))
    batch = task.throughput_batch(splits.test, 4)
    assert batch["input_ids"].shape[0] == min(4, len(splits.test))
    logits = task.forward_for_speed(teacher)(batch)
    assert logits.shape[:2] == batch["input_ids"].shape


# ----- saving -----------------------------------------------------------------------------


def test_a_saved_student_loads_back_with_transformers(tmp_path, tiny_lm_teacher, text_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    task = task_of(lm_recipe(tmp_path, tiny_lm_teacher, text_file))
    task.splits()
    student = task.build_student()
    folder = task.save_model(student, tmp_path / "model", card="# card")
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in folder.iterdir()}
    assert AutoModelForCausalLM.from_pretrained(folder).dtype == torch.bfloat16  # saved in 16 bits by default
    loaded = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():  # the student was rounded as it was saved: widened, the file computes the same
        assert torch.equal(loaded(ids).logits, student(ids).logits)
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == task.tokenizer.get_vocab()
    assert torch.equal(task.load_saved(folder)(ids).logits, loaded(ids).logits)


def test_a_student_of_a_gguf_teacher_saves_as_a_plain_transformers_folder(tmp_path, tiny_gguf_teacher, text_file):
    from transformers import AutoModelForCausalLM

    overrides = ("student.from_teacher.layers=[0,1,2,3]", "output.dtype=float32")
    task = task_of(lm_recipe(tmp_path, tiny_gguf_teacher, text_file, *overrides))
    task.splits()
    teacher = task.load_teacher(str(tiny_gguf_teacher))
    assert teacher.config.quantization_config is not None  # transformers would refuse to save this one
    student = task.build_student()
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        assert torch.equal(student(ids).logits, teacher(ids).logits)
    folder = task.save_model(student, tmp_path / "model", card="")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 4
    assert not list(folder.glob("*.gguf")) and (folder / "model.safetensors").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, teacher(ids).logits)
    # and a GGUF model given as the student itself is saved the same way
    gguf_student = task_of(lm_recipe(tmp_path, tiny_gguf_teacher, text_file, student={"model": str(tiny_gguf_teacher)}))
    gguf_student.splits()
    task.save_model(gguf_student.build_student(), tmp_path / "model2", card="")
    assert "quantization_config" not in json.loads((tmp_path / "model2" / "config.json").read_text())


def test_cache_fingerprint_parts_come_from_the_teacher_tokenizer_and_data(tmp_path, tiny_lm_teacher, text_file):
    task = task_of(lm_recipe(tmp_path, tiny_lm_teacher, text_file))
    assert {p.name for p in task.tokenizer_files()} >= {"tokenizer.json", "tokenizer_config.json"}
    assert [p.name for p in task.teacher_weight_files(str(tiny_lm_teacher))] == ["model.safetensors"]
    assert task.data_files() == [text_file]


# ----- whole runs -----------------------------------------------------------------------


def test_a_kd_run_on_tinyshakespeare_reports_perplexity_for_all_three(tmp_path, tiny_lm_teacher, shakespeare_dir):
    recipe = lm_recipe(
        tmp_path,
        tiny_lm_teacher,
        "tinyshakespeare/input.txt",
        "data.train_limit=48",
        "data.eval_limit=8",
    )
    report = run_recipe(recipe)
    models = report["runs"][0]["models"]
    assert set(models) == {"teacher", "student", "baseline"}
    for role in models.values():
        assert role["metrics"]["perplexity"] > 1 and role["throughput"] > 0
    assert models["student"]["train"]["steps"] == 6
    assert set(models["student"]["fidelity"]) == {"top1_agreement", "mean_kl"}
    assert report["primary_metric"] == "perplexity" and report["higher_is_better"] is False
    assert (recipe.run_dir / "report.html").is_file()
    card = (recipe.run_dir / "model" / "README.md").read_text()
    assert "AutoModelForCausalLM.from_pretrained" in card


def test_a_run_reads_a_per_token_top_k_cache_of_the_teacher(tmp_path, tiny_lm_teacher, text_file):
    cache = tmp_path / "cache"
    teacher = {"signal": "cache", "path": str(cache), "model": str(tiny_lm_teacher), "k": 8}
    recipe = lm_recipe(tmp_path, None, text_file, "evaluation.baseline=false", teacher=teacher)
    ((_, manifest),) = write_recipe_caches(recipe)
    train = task_of(recipe).splits().train
    assert manifest.fields["logits"].layout == "token" and manifest.fields["logits"].k == 8
    assert manifest.examples == len(train) and manifest.positions == len(train) * 15
    report = run_recipe(recipe)
    assert report["teacher_signal"]["stored"] == {"logits": "top-8"}
    models = report["runs"][0]["models"]
    assert models["student"]["metrics"]["perplexity"] > 1 and "teacher" in models
    terms = models["student"]["train"]["final_terms"]
    assert set(terms) == {"forward_kl", "cross_entropy"} and all(v == v for v in terms.values())


def test_students_are_saved_in_bfloat16_by_default_and_evaluated_as_saved(tmp_path, tiny_lm_teacher, text_file):
    from safetensors.torch import load_file

    from kdforge.checks import load_recipe
    from kdforge.errors import RecipeError

    task = task_of(lm_recipe(tmp_path, tiny_lm_teacher, text_file))
    task.splits()
    student = task.build_student()
    folder = task.save_model(student, tmp_path / "model", card="")
    saved = load_file(folder / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    # the student in memory was rounded as it was saved: what the run evaluates is what is on disk
    for name, p in student.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, saved[name].float()), name
    assert next(task.load_saved(folder).parameters()).dtype == torch.float32
    wide = task_of(lm_recipe(tmp_path, tiny_lm_teacher, text_file, "output.dtype=float32"))
    wide.splits()
    folder = wide.save_model(wide.build_student(), tmp_path / "wide", card="")
    assert {t.dtype for t in load_file(folder / "model.safetensors").values()} == {torch.float32}
    digits = Path(__file__).parents[2] / "src" / "kdforge" / "recipes" / "digits_kd.yaml"
    with pytest.raises(RecipeError, match="output.dtype: the .* task saves its models as they trained"):
        load_recipe(str(digits), ["output.dtype=bfloat16"])


def _crash_then_resume(recipe, step: int, monkeypatch):
    """Run ``recipe`` until a simulated crash at optimizer step ``step``, then ``--resume`` it."""
    crash_at_step(recipe, step, monkeypatch)
    return run_recipe(recipe, resume=True)


def test_a_crashed_run_resumes_to_the_same_student(tmp_path, lm_tokenizer, text_file, monkeypatch):

    teacher = save_llama(tmp_path / "tied", lm_tokenizer, layers=3, tied=True)  # tied weights go through checkpoints
    args = ("evaluation.baseline=false", "student.from_teacher.layers=[0,2]")
    reference = run_recipe(lm_recipe(tmp_path / "ref", teacher, text_file, *args))

    recipe = lm_recipe(tmp_path / "crash", teacher, text_file, *args)
    resumed = _crash_then_resume(recipe, 4, monkeypatch)
    student = resumed["runs"][0]["models"]["student"]
    assert student["train"]["resumed_from"] == 3
    assert student["metrics"] == reference["runs"][0]["models"]["student"]["metrics"]


def test_taid_end_to_end_t_steps_with_the_optimizer_and_resumes(tmp_path, lm_tokenizer, text_file, monkeypatch):
    """TAID on a causal LM: t logged every log step, monotone, plotted, and restored from the checkpoint."""

    teacher = save_llama(tmp_path / "teacher", lm_tokenizer, layers=3)
    args = (
        "evaluation.baseline=false",
        "student.from_teacher.layers=[0,2]",
        "objective[0].loss=taid",
        "objective[0].params={t_start: 0.2, alpha: 0.05}",
        "training.steps=8",
        "training.log_every=1",
    )
    reference_recipe = lm_recipe(tmp_path / "ref", teacher, text_file, *args)
    reference = run_recipe(reference_recipe)

    def t_values(run_dir):
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [r["scalars"]["taid/t"] for r in records if "scalars" in r]

    ts = t_values(reference_recipe.run_dir)
    assert len(ts) == 8 and ts == sorted(ts) and 0.2 <= ts[0] < ts[-1] <= 1.0
    assert "TAID&#39;s interpolation t" in (reference_recipe.run_dir / "report.html").read_text()

    recipe = lm_recipe(tmp_path / "crash", teacher, text_file, *args)
    resumed = _crash_then_resume(recipe, 5, monkeypatch)
    assert t_values(recipe.run_dir) == pytest.approx(ts, abs=1e-12)  # t continued from the checkpointed state
    assert resumed["runs"][0]["models"]["student"]["metrics"] == reference["runs"][0]["models"]["student"]["metrics"]
