"""GGUF export of a causal-LM student: what transformers (llama.cpp's format) reads back is the student."""

from __future__ import annotations

import pytest
import torch

from kdforge.cli import main
from kdforge.models.gguf_export import export_gguf
from tiny_lm import make_llama, make_tokenizer


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("student")
    tokenizer = make_tokenizer()
    model = make_llama(len(tokenizer), layers=2, hidden=64, tied=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


@pytest.mark.parametrize(("quantization", "tolerance"), [("F32", 1e-5), ("F16", 0.05), ("Q8_0", 0.6)])
def test_the_exported_file_loads_as_the_same_model(saved, tmp_path, quantization, tolerance):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, model, tokenizer = saved
    path = export_gguf(model, tokenizer, tmp_path / f"s.{quantization}.gguf", quantization=quantization)
    again = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    ids = torch.randint(0, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (again(input_ids=ids).logits - model(input_ids=ids).logits).abs().max() < tolerance
    text = "To be or not to be, that is the question"
    read = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert read(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert again.config.tie_word_embeddings  # one copy of the tied embeddings in the file


def test_quantized_files_are_smaller(saved, tmp_path):
    _, model, tokenizer = saved
    sizes = {q: export_gguf(model, tokenizer, tmp_path / f"{q}.gguf", quantization=q).stat().st_size for q in
             ("F32", "Q8_0", "Q4_1")}  # fmt: skip
    assert sizes["Q4_1"] < sizes["Q8_0"] < sizes["F32"] / 2


def test_cli_exports_a_saved_student_and_refuses_mistakes(saved, tmp_path, capsys):
    folder, _, _ = saved
    target = tmp_path / "student.Q8_0.gguf"
    with pytest.raises(SystemExit) as done:
        main(["export", str(folder), "--gguf", str(target)])
    assert done.value.code == 0 and target.is_file() and "Q8_0" in capsys.readouterr().out
    for args, message in (
        (["--gguf", str(target)], "the file exists"),
        (["--gguf", str(tmp_path / "x.gguf"), "--quantization", "Q2_K"], "--quantization Q2_K: use one of"),
    ):
        with pytest.raises(SystemExit) as refused:
            main(["export", str(folder), *args])
        assert refused.value.code == 2 and message in capsys.readouterr().err


def test_exporting_a_runs_student_measures_the_file_and_adds_it_to_the_report(tmp_path, tiny_lm_teacher, capsys):
    import json

    from kdforge.checks import parse_recipe
    from kdforge.runner import run_recipe
    from tiny_lm import TEXT

    (tmp_path / "text.txt").write_text(TEXT * 4)
    recipe = {
        "name": "tiny",
        "task": "causal_lm",
        "teacher": {"model": str(tiny_lm_teacher)},
        "student": {"from_teacher": {"layers": [0, 3]}},
        "data": {"format": "text", "path": str(tmp_path / "text.txt"), "max_length": 16},
        "objective": [{"loss": "forward_kl", "weight": 1.0}],
        "training": {"batch_size": 4, "steps": 2, "lr": 1e-3},
        "evaluation": {"baseline": False, "throughput_batches": 1, "throughput_repeats": 1},
        "output": {"dir": str(tmp_path / "runs")},
    }
    run_recipe(parse_recipe(recipe))
    run = tmp_path / "runs" / "tiny"
    target = tmp_path / "tiny.Q8_0.gguf"
    with pytest.raises(SystemExit) as done:
        main(["export", str(run / "model"), "--gguf", str(target), "--quantization", "Q8_0"])
    assert done.value.code == 0 and "test split: perplexity" in capsys.readouterr().out
    row = json.loads((run / "report.json").read_text())["exports"][0]
    assert row["format"] == "GGUF Q8_0" and row["size_bytes"] == target.stat().st_size
    # 8-bit weights: the perplexity of the file is the saved student's, within the rounding
    assert row["metrics"]["perplexity"] == pytest.approx(row["saved_metrics"]["perplexity"], rel=0.05)
    assert "Exports of the student" in (run / "report.html").read_text()


def test_a_swiftkv_model_is_not_exported_to_gguf(tmp_path):
    from kdforge.errors import KDForgeError
    from kdforge.models.swiftkv import to_swiftkv

    tokenizer = make_tokenizer()
    model = to_swiftkv(make_llama(len(tokenizer), layers=4, hidden=32), num_key_value_layers=2)
    with pytest.raises(KDForgeError, match="SwiftKV"):
        export_gguf(model, tokenizer, tmp_path / "s.gguf", quantization="F32")
