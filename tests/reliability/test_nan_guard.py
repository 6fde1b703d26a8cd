"""The NaN guard: a NaN or inf is caught at the step it happens, named, and either stops the run
(pointing at the last good checkpoint, which stays intact) or, with ``training.nonfinite: skip``,
leaves the batch out and counts it in the report."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file

from conftest import tiny
from kdforge.cli import main
from kdforge.engine.checkpoint import list_checkpoints
from kdforge.errors import NonFiniteError
from kdforge.objective import Objective
from kdforge.report.html import write_report
from kdforge.runner import run_recipe
from kdforge.tasks import TASKS


def kd_recipe(out, teacher, *extra):
    # 12 steps, checkpoints every 5 (conftest's TINY)
    return tiny("digits_kd", out, f"teacher.model={teacher}", *extra)


def poison(monkeypatch, steps: set[int], term: str = "hinton_kd") -> None:
    """Make one objective term NaN at the given optimizer steps of every phase that uses it."""
    original = Objective.__call__

    def call(self, student, teacher, batch, at):
        loss, terms = original(self, student, teacher, batch, at)
        if at in steps and term in terms:
            terms = {**terms, term: terms[term] * float("nan")}
            loss = sum(terms.values())
        return loss, terms

    monkeypatch.setattr(Objective, "__call__", call)


def test_a_nan_stops_the_run_at_its_step_naming_the_term_and_the_last_good_checkpoint(
    tmp_path, digits_teacher, monkeypatch
):
    recipe = kd_recipe(tmp_path, digits_teacher)
    poison(monkeypatch, {7})
    with pytest.raises(NonFiniteError) as info:
        run_recipe(recipe)
    message = str(info.value)
    ckpts = recipe.run_dir / "checkpoints" / "student"
    assert "at step 7 of student" in message and "from: hinton_kd" in message
    assert f"last good checkpoint: {ckpts / 'step-0000005'}" in message and "--resume" in message
    assert info.value.term == "hinton_kd"
    # the last good checkpoint is whole and holds finite weights
    assert [p.name for p in list_checkpoints(ckpts)] == ["step-0000005"]
    weights = load_file(str(ckpts / "step-0000005" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_the_cli_prints_the_nan_on_one_line_and_exits_2(tmp_path, digits_teacher, monkeypatch, capsys):
    poison(monkeypatch, {2})
    with pytest.raises(SystemExit) as exit_info:
        main(["run", "digits_kd", "--set", f"teacher.model={digits_teacher}", "--set", f"output.dir={tmp_path}",
              "--set", "training.epochs=null", "--set", "training.steps=6"])  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "NaN or inf at step 2" in err
    assert "no checkpoint yet" in err and "Traceback" not in err


def test_skip_leaves_the_batches_out_and_counts_them_in_the_report(tmp_path, digits_teacher, monkeypatch):
    recipe = kd_recipe(tmp_path, digits_teacher, "training.nonfinite=skip")
    poison(monkeypatch, {3, 8})
    report = run_recipe(recipe)
    train = report["runs"][0]["models"]["student"]["train"]
    assert train["skipped_batches"] == [{"step": 3, "term": "hinton_kd"}, {"step": 8, "term": "hinton_kd"}]
    assert train["steps"] == 12 and torch.isfinite(torch.tensor(train["final_loss"]))
    # the baseline has no hinton_kd term: nothing skipped there
    assert "skipped_batches" not in report["runs"][0]["models"]["baseline"]["train"]
    weights = load_file(str(recipe.run_dir / "model" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    html = write_report(recipe.run_dir).read_text()
    assert "2 batches skipped for a NaN or inf" in html and "3 (hinton_kd), 8 (hinton_kd)" in html
    logged = [json.loads(line) for line in (recipe.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("skipped") == 2 for r in logged if r["phase"] == "student")


def test_skip_stops_once_max_skipped_batches_were_left_out(tmp_path, digits_teacher, monkeypatch):
    recipe = kd_recipe(tmp_path, digits_teacher, "training.nonfinite=skip", "training.max_skipped=2")
    poison(monkeypatch, {1, 2, 3, 4})
    with pytest.raises(NonFiniteError, match=r"2 batches of student were skipped .* step 3 gave another"):
        run_recipe(recipe)


def test_a_skipped_batch_changes_no_weight(tmp_path, digits_teacher, monkeypatch):
    """A run whose every batch is NaN from step 0 on ends with the student as initialised."""
    recipe = kd_recipe(tmp_path, digits_teacher, "training.nonfinite=skip", "training.steps=4",
                       "training.optimizer.weight_decay=0.1")  # fmt: skip
    poison(monkeypatch, {0, 1, 2, 3})
    run_recipe(recipe)
    set_seed(recipe.training.seed)  # as the runner does before it builds the student
    fresh = TASKS.get("classification")(recipe).build_student()
    saved = load_file(str(recipe.run_dir / "model" / "model.safetensors"))
    for name, value in fresh.state_dict().items():
        assert torch.equal(saved[name], value), name


def test_nan_in_the_teacher_outputs_is_named_as_the_teachers(tmp_path, digits_teacher, monkeypatch):
    """A teacher whose weights hold a NaN: the run stops at step 0 naming teacher.logits, not a loss term."""
    import shutil

    broken = tmp_path / "broken-teacher"
    shutil.copytree(digits_teacher, broken)
    weights = load_file(str(broken / "model.safetensors"))
    for value in weights.values():  # every bias: each logit is NaN
        if value.dim() == 1:
            value[0] = float("nan")
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(NonFiniteError, match=r"at step 0 of student \(from: teacher\.logits\)"):
        run_recipe(kd_recipe(tmp_path / "runs", broken))


def test_a_non_finite_gradient_with_a_finite_loss_is_caught_too(tmp_path, digits_teacher, monkeypatch):
    """sqrt(|0 * logits|) adds 0 to the loss but NaN to every gradient: the clipped norm is not finite."""
    original = Objective.__call__

    def call(self, student, teacher, batch, at):
        loss, terms = original(self, student, teacher, batch, at)
        if at == 4 and teacher is not None:
            loss = loss + (student.logits.sum() * 0).abs().sqrt()
        return loss, terms

    monkeypatch.setattr(Objective, "__call__", call)
    with pytest.raises(NonFiniteError, match=r"at step 4 of student \(from: gradient\)"):
        run_recipe(kd_recipe(tmp_path / "stop", digits_teacher))
    report = run_recipe(kd_recipe(tmp_path / "skip", digits_teacher, "training.nonfinite=skip"))
    assert report["runs"][0]["models"]["student"]["train"]["skipped_batches"] == [{"step": 4, "term": "gradient"}]
    weights = load_file(str(tmp_path / "skip" / "digits-kd" / "model" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
