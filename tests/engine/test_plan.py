"""kdforge plan: the memory estimate's components are exact counts, and the CLI shows and uses them."""

import gc
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import kdforge.plan as plan_module
from conftest import tiny
from kdforge.cli import app, main
from kdforge.plan import MemoryPlan, extrapolate, human, plan_recipe, signal_models

runner = CliRunner()

#: digits: 64 pixel features, 10 classes; the teacher fixture is 64-64-10, digits_kd's student 64-16-10
TEACHER_PARAMS = 64 * 64 + 64 + 64 * 10 + 10
STUDENT_PARAMS = 64 * 16 + 16 + 16 * 10 + 10
FP32 = 4


def _plan(out, teacher, *extra):
    gc.collect()  # earlier tests' garbage in reference cycles would count as this plan's
    return plan_recipe(tiny("digits_kd", out, f"teacher.model={teacher}", *extra))


def test_components_are_exact_counts_for_an_mlp(tmp_path, digits_teacher):
    p = _plan(tmp_path, digits_teacher)
    batch = p.batch_size
    assert batch == 64
    assert p.teacher_weights == TEACHER_PARAMS * FP32
    assert p.student_weights == STUDENT_PARAMS * FP32
    assert p.other_weights == 0
    assert p.trainable_params == STUDENT_PARAMS
    assert p.gradients == STUDENT_PARAMS * FP32
    assert p.optimizer_state == 2 * STUDENT_PARAMS * FP32  # AdamW: two moments per parameter
    # the first linear layer keeps its input [B, 64], the second the ReLU's output [B, 16] (one storage)
    assert sorted(p.probe) == [2, 4]  # batches of 2 and 4 examples (a batch of 1 has no in-batch negatives)
    assert p.probe[2][0] == 2 * (64 + 16) * FP32
    assert p.activations == batch * (64 + 16) * FP32
    # both sides' logits [B, 10] are alive while the loss runs, and backward makes the student's a gradient
    assert p.probe[4][1] - p.probe[2][1] >= 2 * 3 * 10 * FP32
    assert p.loss_logits >= 3 * batch * 10 * FP32
    # CPU AdamW: sqrt(exp_avg_sq) and its quotient, the size of the largest parameter (16 x 64)
    assert p.optimizer_step == 2 * 64 * 16 * FP32
    assert p.sequence_length is None
    assert p.peak == (
        p.teacher_weights + p.student_weights + p.gradients + p.optimizer_state
        + p.activations + p.loss_logits + p.optimizer_step
    )  # fmt: skip
    assert p.device == "cpu" and p.available and p.fits


@pytest.mark.parametrize(("momentum", "states"), [(0.0, 0), (0.9, 1)])
def test_sgd_keeps_one_momentum_buffer_or_none(tmp_path, digits_teacher, momentum, states):
    p = _plan(tmp_path, digits_teacher, "training.optimizer.name=sgd", f"training.optimizer.momentum={momentum}")
    assert p.optimizer_state == states * STUDENT_PARAMS * FP32
    assert p.optimizer_step == 0  # no weight decay: SGD updates in place


def test_adam_with_weight_decay_adds_a_decayed_gradient_copy(tmp_path, digits_teacher):
    p = _plan(tmp_path, digits_teacher, "training.optimizer.name=adam", "training.optimizer.weight_decay=0.01")
    assert p.optimizer_state == 2 * STUDENT_PARAMS * FP32
    assert p.optimizer_step == 3 * 64 * 16 * FP32


def test_activations_scale_linearly_with_the_batch(tmp_path, digits_teacher):
    small = _plan(tmp_path, digits_teacher, "training.batch_size=16")
    large = _plan(tmp_path, digits_teacher, "training.batch_size=128")
    assert small.probe == large.probe  # the same probe batches, only the extrapolation differs
    per_example = (large.probe[4][0] - large.probe[2][0]) / 2
    assert large.activations - small.activations == (128 - 16) * per_example
    assert large.loss_logits - small.loss_logits == (128 - 16) * (large.probe[4][1] - large.probe[2][1]) / 2
    assert extrapolate({2: 10, 4: 40}, 8) == 10 + 15 * 6
    assert extrapolate({2: 10, 4: 8}, 8) == 10  # never decreasing
    assert extrapolate({1: 7}, 5) == 35  # one probe size (a training set of one example): proportional


def test_bf16_halves_the_teacher_weights_not_the_students(tmp_path, digits_teacher):
    fp32 = _plan(tmp_path, digits_teacher)
    bf16 = _plan(tmp_path, digits_teacher, "teacher.dtype=bfloat16", "training.precision=bf16")
    assert bf16.teacher_weights == fp32.teacher_weights // 2
    # mixed precision keeps fp32 master weights, gradients and optimizer state
    assert (bf16.student_weights, bf16.gradients, bf16.optimizer_state) == (
        fp32.student_weights,
        fp32.gradients,
        fp32.optimizer_state,
    )
    # under autocast the saved inputs are bf16 (2 bytes), plus the bf16 copy of the second layer's weight,
    # kept for its input's gradient (batch-independent; the first layer's input needs no gradient)
    slope = (bf16.probe[4][0] - bf16.probe[2][0]) / 2
    assert slope == (64 + 16) * 2
    assert bf16.probe[2][0] - 2 * slope == 16 * 10 * 2


def test_a_teacher_without_weights_counts_none():
    model = torch.nn.Linear(2, 2)
    cache = SimpleNamespace(reader=object())
    ensemble = SimpleNamespace(members=[SimpleNamespace(model=model), cache])
    assert signal_models(cache) == []
    assert signal_models(ensemble) == [model]


def test_cli_plan_prints_the_breakdown(tmp_path, digits_teacher):
    result = runner.invoke(
        app,
        ["plan", "digits_kd", "--set", f"teacher.model={digits_teacher}", "--set", f"output.dir={tmp_path}"],
        env={"COLUMNS": "200"},
    )
    assert result.exit_code == 0, result.output
    for row in ["teacher weights", "student weights", "gradients", "optimizer state (adamw)", "activations", "peak"]:
        assert row in result.output
    assert human(TEACHER_PARAMS * FP32) in result.output
    assert "available on cpu" in result.output
    assert "fits: peak" in result.output


def test_cli_plan_of_a_bad_recipe_exits_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["plan", "digits_kd", "--set", "training.batch_size=0"])
    assert info.value.code == 2
    assert "training.batch_size" in capsys.readouterr().err


def test_run_warns_when_the_estimate_exceeds_free_memory(tmp_path, digits_teacher, monkeypatch, capsys):
    monkeypatch.setattr(plan_module, "available_memory", lambda device: 1000)
    args = ["run", "digits_kd", "--set", f"teacher.model={digits_teacher}", "--set", f"output.dir={tmp_path}"]
    short = ["training.epochs=null", "training.steps=3", "evaluation.baseline=false"]
    tiny_run = [s for o in short for s in ("--set", o)]
    with pytest.raises(SystemExit) as info:
        main([*args, *tiny_run])  # warns, then runs all the same
    assert info.value.code == 0
    captured = capsys.readouterr()
    assert "warning:" in captured.err and "may not fit" in captured.err
    assert "1.0 kB available" in captured.err
    assert (tmp_path / "digits-kd" / "report.json").exists()


def test_kdforge_plan_0_skips_the_check(tmp_path, digits_teacher, monkeypatch):
    monkeypatch.setattr(plan_module, "available_memory", lambda device: 1000)
    recipe = tiny("digits_kd", tmp_path, f"teacher.model={digits_teacher}")
    assert plan_module.warning_for(recipe) is not None
    monkeypatch.setenv("KDFORGE_PLAN", "0")
    assert plan_module.warning_for(recipe) is None


def test_a_planner_bug_never_stops_a_run(tmp_path, digits_teacher, monkeypatch, capsys):
    def broken(recipe):
        raise RuntimeError("boom")

    monkeypatch.setattr(plan_module, "plan_recipe", broken)
    plan_module.warn_if_too_big(tiny("digits_kd", tmp_path, f"teacher.model={digits_teacher}"))
    assert "boom" in capsys.readouterr().err


def test_human_units():
    assert human(512 * 1024**2) == "512.0 MB"
    assert human(3 * 1024**3) == "3.00 GB"
    assert human(19240) == "18.8 kB"
    assert human(None) == "unknown"
    assert isinstance(MemoryPlan.peak, property)


# ----- causal LMs: the fused linear path, and models planned from their configuration alone ----------


def _lm_recipe(folder, teacher, *extra):
    import yaml

    from kdforge.checks import load_recipe
    from tiny_lm import TEXT

    (folder / "text.txt").write_text(TEXT * 4)
    recipe = {
        "name": "plan-lm",
        "task": "causal_lm",
        "teacher": {"model": str(teacher)},
        "student": {"from_teacher": {"num_layers": 4}},
        "data": {"format": "text", "path": str(folder / "text.txt"), "max_length": 32},
        "objective": [{"loss": "forward_kl", "weight": 1.0}],
        "training": {"batch_size": 8, "steps": 2},
        "output": {"dir": str(folder / "runs")},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return load_recipe(str(folder / "recipe.yaml"), list(extra))


@pytest.fixture(scope="module")
def six_layer_lm(tmp_path_factory, lm_tokenizer):
    """A 6-layer tiny Llama, and a copy of its folder without the weights (config and tokenizer only)."""
    import shutil

    from tiny_lm import save_llama

    whole = save_llama(tmp_path_factory.mktemp("six-layers"), lm_tokenizer, layers=6)
    config_only = tmp_path_factory.mktemp("six-layers-config")
    for f in whole.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, config_only / f.name)
    return whole, config_only


def test_from_config_plans_without_the_weights_what_the_weights_give(tmp_path, six_layer_lm):
    whole, config_only = six_layer_lm
    gc.collect()
    loaded = plan_recipe(_lm_recipe(tmp_path, whole))
    gc.collect()
    built = plan_recipe(_lm_recipe(tmp_path, config_only), from_config=True)
    # weights, gradients and optimizer state from the parameters' shapes; the activations of the 4-layer
    # student from probes of it cut to 1 and 2 blocks (every block keeps the same tensors for backward)
    assert built.rows() == loaded.rows()
    assert built.peak == loaded.peak
    assert any("extrapolated to the student's 4" in note for note in built.notes)
    # the probe did run cut: at 2 blocks it kept less than the whole student did
    assert built.probe[2][0] < loaded.probe[2][0] and built.probe[2][1] == loaded.probe[2][1]


def test_a_folder_without_weights_is_refused_unless_planned_from_config(tmp_path, six_layer_lm):
    from kdforge.errors import ModelRefError

    _, config_only = six_layer_lm
    with pytest.raises(ModelRefError, match="teacher.model"):
        plan_recipe(_lm_recipe(tmp_path, config_only))


def test_the_plan_counts_the_fused_linear_path_the_run_takes(tmp_path, six_layer_lm):
    whole, _ = six_layer_lm
    fused = plan_recipe(_lm_recipe(tmp_path, whole))
    logits = plan_recipe(_lm_recipe(tmp_path, whole, "training.fused_linear=false"))
    # the fused path never keeps [B, L, V] logits, their log-softmax copies or their gradient
    assert fused.loss_logits < logits.loss_logits / 2
    assert abs(fused.activations - logits.activations) < 0.01 * logits.activations  # the model's own, as before


def test_cli_plans_for_a_gpu_from_a_machine_without_one(tmp_path, digits_teacher, capsys):
    args = ["plan", "digits_kd", "--set", f"teacher.model={digits_teacher}", "--set", f"output.dir={tmp_path}"]
    result = runner.invoke(app, [*args, "--device", "cuda"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "available on cuda" in result.output and "planned for cuda" in result.output
    assert "unknown (available memory unknown)" in result.output
    gpu = plan_recipe(tiny("digits_kd", tmp_path, f"teacher.model={digits_teacher}"), device="cuda")
    # GPU AdamW's foreach step: sqrt(exp_avg_sq) of every parameter at once; then the larger of it and the activations
    assert gpu.optimizer_step == STUDENT_PARAMS * FP32
    transient = gpu.activations + gpu.loss_logits
    assert gpu.peak == gpu.persistent + gpu.gradients + max(transient, gpu.optimizer_step)
    with pytest.raises(SystemExit) as info:
        main([*args, "--device", "tpu"])
    assert info.value.code == 2 and "--device tpu: give cuda or cpu" in capsys.readouterr().err
