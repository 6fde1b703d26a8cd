"""A disk that fills up: a clear one-line error, the last good checkpoint intact, and a resume once
space is free that ends where an uninterrupted run ends.

The full disk is simulated: the checkpoint writer (or the model saver) writes part of its file and
then fails with ENOSPC, as a real write does when the device fills in the middle of a file.
"""

from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny
from kdforge.cli import main
from kdforge.engine import checkpoint as checkpoint_module
from kdforge.engine.checkpoint import list_checkpoints, load_checkpoint
from kdforge.errors import CheckpointError
from kdforge.models import store
from kdforge.runner import run_recipe
from kdforge.tasks import TASKS

RUN = ["training.steps=12", "training.checkpoint_every=5", "training.deterministic=true"]


def _fill_the_disk_at(monkeypatch, target, name: str, when) -> None:
    """Replace ``target.name`` by a writer that, when ``when(path)``, writes half a file then raises ENOSPC."""
    original = getattr(target, name)

    def writer(obj, path, *args, **kwargs):
        if when(str(path)):
            with open(path, "wb") as fh:
                fh.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return original(obj, path, *args, **kwargs)

    monkeypatch.setattr(target, name, writer)


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one_and_resume_finishes(
    tmp_path, digits_teacher, monkeypatch
):
    reference = run_recipe(tiny("digits_kd", tmp_path / "ref", f"teacher.model={digits_teacher}", *RUN))
    recipe = tiny("digits_kd", tmp_path / "full", f"teacher.model={digits_teacher}", *RUN)
    _fill_the_disk_at(monkeypatch, checkpoint_module, "save_model", lambda path: "step-0000010" in path)
    with pytest.raises(CheckpointError) as info:
        run_recipe(recipe)
    ckpts = recipe.run_dir / "checkpoints" / "student"
    message = str(info.value)
    assert "could not write checkpoint" in message and "No space left on device" in message
    assert f"last good checkpoint: {ckpts / 'step-0000005'}" in message and "free disk space and resume" in message
    # the half-written checkpoint is gone; the last good one is whole and loads
    assert [p.name for p in ckpts.iterdir()] == ["step-0000005"]
    model = TASKS.get("classification")(recipe).build_student()
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    assert load_checkpoint(ckpts / "step-0000005", model=model, optimizer=optimizer, scheduler=scheduler).step == 5

    monkeypatch.undo()  # space is free again
    resumed = run_recipe(recipe, resume=True)
    assert resumed["runs"][0]["models"]["student"]["train"]["resumed_from"] == 5
    for role in ("model", "baseline"):
        a = load_file(str(tmp_path / "ref" / "digits-kd" / role / "model.safetensors"))
        b = load_file(str(recipe.run_dir / role / "model.safetensors"))
        assert all(a[k].equal(b[k]) for k in a)
    assert resumed["runs"][0]["models"]["student"]["metrics"] == reference["runs"][0]["models"]["student"]["metrics"]


def test_a_full_disk_while_saving_the_model_is_one_line_and_nothing_finished_is_lost(
    tmp_path, digits_teacher, monkeypatch, capsys
):
    args = ["run", "digits_kd", *[x for s in [*RUN, "training.epochs=null", f"teacher.model={digits_teacher}",
            f"output.dir={tmp_path}", "evaluation.throughput_batches=1", "evaluation.throughput_repeats=1"]
            for x in ("--set", s)]]  # fmt: skip
    _fill_the_disk_at(monkeypatch, store, "save_model", lambda path: "model.tmp" in path)
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: the disk is full while writing"), err
    assert "--resume" in err and "Traceback" not in err
    run_dir = tmp_path / "digits-kd"
    assert not (run_dir / "model").exists(), "no half-written model where a finished one would be"
    # the student's last checkpoint (step 10) is still there: a resume trains 2 steps, not 12
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints" / "student")] == ["step-0000005", "step-0000010"]
    monkeypatch.undo()
    with pytest.raises(SystemExit) as done:
        main([*args, "--resume"])
    assert done.value.code in (None, 0)
    report = json.loads((run_dir / "report.json").read_text())
    assert report["runs"][0]["models"]["student"]["train"]["resumed_from"] == 10
