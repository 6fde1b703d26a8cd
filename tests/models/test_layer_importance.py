"""Block influence (ShortGPT) and angular distance (Gromov et al.) of a model's blocks, and the blocks
a shallower student keeps: checked against scores computed by hand on a model whose blocks are known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdforge.models.layer_importance import BlockScores, score_blocks, select_blocks
from test_tasks_encoders import beir_dir  # noqa: F401 F811  (a fixture)


class Scale(nn.Module):
    """A block that adds ``alpha`` times a fixed rotation of its input: alpha 0 changes nothing."""

    def __init__(self, alpha: float, dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.alpha = alpha
        self.register_buffer("mix", torch.randn(dim, dim, generator=g))

    def forward(self, hidden_states, mask=None):  # noqa: ANN001
        return (hidden_states + self.alpha * hidden_states @ self.mix,)  # a tuple, as HF layers return


class Stack(nn.Module):
    def __init__(self, alphas):
        super().__init__()
        self.layers = nn.ModuleList(Scale(a, 8, i) for i, a in enumerate(alphas))

    def forward(self, x, attention_mask=None):  # noqa: ANN001
        for layer in self.layers:
            x = layer(x, mask=attention_mask)[0]
        return x


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def test_scores_equal_the_definitions_computed_by_hand():
    torch.manual_seed(0)
    model = Stack([0.0, 1.0, 0.1, 2.0])
    x = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])  # right and left padding
    batches = [{"x": x, "attention_mask": mask}]
    scores = score_blocks(model.layers, batches, lambda b: model(b["x"], b["attention_mask"]))
    streams = [x]
    for layer in model.layers:
        streams.append(layer(streams[-1])[0])
    real = mask.bool()
    for i in range(4):
        expected = (1 - _cos(streams[i][real], streams[i + 1][real])).mean()
        assert scores.block_influence[i] == pytest.approx(float(expected), abs=1e-9)
    assert scores.block_influence[0] == pytest.approx(0.0, abs=1e-9)  # the identity block
    assert scores.tokens == int(real.sum()) and scores.sequences == 3
    last = torch.tensor([4, 2, 4])  # each sequence's last real token
    for n in (1, 2, 4):
        for start in range(4 - n + 1):
            a, b = streams[start][torch.arange(3), last], streams[start + n][torch.arange(3), last]
            expected = (torch.arccos(_cos(a, b).clamp(-1, 1)) / math.pi).mean()
            assert scores.angular[n][start] == pytest.approx(float(expected), abs=1e-9)


def test_each_selection_keeps_what_its_paper_says():
    scores = BlockScores(
        block_influence=[0.5, 0.01, 0.3, 0.02, 0.03, 0.4],
        angular={2: [0.3, 0.2, 0.25, 0.05, 0.4]},  # the span of blocks 3 and 4 changes the stream least
    )
    assert select_blocks(scores, 4, "importance") == [0, 2, 4, 5]  # the two lowest BI (1 and 3) go
    assert select_blocks(scores, 4, "angular") == [0, 1, 2, 5]  # one contiguous span of 2 goes
    assert select_blocks(scores, 4, "even") == [0, 2, 3, 5]
    assert select_blocks(scores, 6, "angular") == list(range(6))
    with pytest.raises(ValueError, match="cannot keep 7 of 6"):
        select_blocks(scores, 7, "importance")


def test_a_model_that_skips_a_block_is_refused():
    model = Stack([0.1, 0.2])
    with pytest.raises(ValueError, match="did not run every block"):
        score_blocks(model.layers, [{"x": torch.randn(1, 2, 8)}], lambda b: model.layers[0](b["x"]))


# ----- the causal LM task: student.from_teacher.select ------------------------------------------


def _lm_task(folder, teacher, select: str, num_layers: int = 2):
    import yaml

    from kdforge.checks import load_recipe
    from kdforge.commands import build_task
    from tiny_lm import TEXT

    (folder / "text.txt").write_text(TEXT * 4)
    recipe = {
        "name": "select",
        "task": "causal_lm",
        "teacher": {"model": str(teacher)},
        "student": {"from_teacher": {"num_layers": num_layers, "select": select, "calibration_batches": 2}},
        "data": {"format": "text", "path": str(folder / "text.txt"), "max_length": 16},
        "objective": [{"loss": "forward_kl", "weight": 1.0}],
        "training": {"batch_size": 4, "steps": 2},
        "output": {"dir": str(folder / "runs")},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return build_task(load_recipe(str(folder / "recipe.yaml"), []))


@pytest.mark.parametrize("select", ["importance", "angular"])
def test_a_causal_lm_student_keeps_the_teachers_layers_its_scores_choose(tmp_path, tiny_lm_teacher, select):
    from transformers import AutoModelForCausalLM

    task = _lm_task(tmp_path, tiny_lm_teacher, select)
    student = task.build_student()
    record = task.training_info(0)["layer_selection"]
    assert record["select"] == select and len(record["kept"]) == 2 and len(record["block_influence"]) == 4
    # the same scores, computed here on the same batches of the training split, choose the same layers
    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm_teacher).eval()
    train = task.splits().train
    batches = [task.collate([train[i] for i in range(s, s + 4)]) for s in (0, 4)]
    scores = score_blocks(
        teacher.model.layers,
        batches,
        lambda b: teacher.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]),
    )
    assert record["block_influence"] == pytest.approx(scores.block_influence, rel=1e-5)
    assert record["kept"] == select_blocks(scores, 2, select)
    if select == "angular":
        assert record["angular_distance"] == pytest.approx(scores.angular[2], rel=1e-5) and record["span"] == 2
    # and the student holds exactly those teacher layers
    for new, old in enumerate(record["kept"]):
        for name, tensor in student.model.layers[new].state_dict().items():
            assert torch.equal(tensor, teacher.model.layers[old].state_dict()[name].float()), name


def test_select_with_explicit_layers_is_refused():
    from kdforge.tasks.lm_config import FromTeacher

    with pytest.raises(ValueError, match="select: importance chooses num_layers"):
        FromTeacher(layers=[0, 3], select="importance")


# ----- the embedding task: student.select on MiniLM's layers -------------------------------------


@pytest.mark.parametrize("select", ["importance", "angular"])
def test_an_encoder_student_keeps_the_teachers_layers_its_scores_choose(tmp_path, beir_dir, select):  # noqa: F811
    from kdforge.commands import build_task
    from kdforge.models.sentence_encoder import transformer_of
    from test_tasks_encoders import MINILM_TERMS, _recipe

    student_cfg = {"num_layers": 3, "select": select, "calibration_batches": 2}
    recipe = _recipe("embedding", beir_dir, tmp_path, MINILM_TERMS[:1], student=student_cfg)
    task = build_task(recipe)
    student = task.build_student()
    record = task.training_info(0)["layer_selection"]
    assert record["select"] == select and len(record["kept"]) == 3 and len(record["block_influence"]) == 6
    # recomputed here on the same 2 batches of 4 training texts
    family = task.family
    teacher = transformer_of(family.load_teacher(recipe.teacher.model))
    texts = family.calibration_texts()[:8]
    batches = [family.tokens(texts[s : s + 4], 32) for s in (0, 4)]
    scores = score_blocks(teacher.encoder.layer, batches, lambda b: teacher(**b))
    assert record["block_influence"] == pytest.approx(scores.block_influence, rel=1e-5)
    assert record["kept"] == select_blocks(scores, 3, select)
    kept = transformer_of(student).encoder.layer
    for new, old in enumerate(record["kept"]):
        for name, tensor in kept[new].state_dict().items():
            assert torch.equal(tensor, teacher.encoder.layer[old].state_dict()[name]), name


def test_a_run_records_the_scores_in_its_folder_and_plots_them_in_its_report(tmp_path, tiny_lm_teacher):
    import json

    from kdforge.report.plots import layer_selection
    from kdforge.runner import run_recipe

    task = _lm_task(tmp_path, tiny_lm_teacher, "importance")
    recipe = task.recipe.model_copy(
        update={"evaluation": task.recipe.evaluation.model_copy(update={"baseline": False, "throughput_batches": 1})}
    )
    report = run_recipe(recipe)
    saved = json.loads((tmp_path / "runs" / "select" / "model.train.json").read_text())
    assert (
        saved["layer_selection"]["kept"] == report["runs"][0]["models"]["student"]["train"]["layer_selection"]["kept"]
    )
    html = (tmp_path / "runs" / "select" / "report.html").read_text()
    assert "The teacher&#39;s layers the student kept" in html or "The teacher's layers the student kept" in html
    assert layer_selection(saved["layer_selection"]).startswith(b"\x89PNG")
    assert layer_selection({"block_influence": []}) is None
