import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import tiny
from kdforge.engine.checkpoint import list_checkpoints
from kdforge.engine.optim import lr_factor
from kdforge.errors import CheckpointError, RunDirError
from kdforge.objective import Objective
from kdforge.runner import run_recipe


def metrics_of(report):
    return {
        role: {**m["metrics"], **m.get("fidelity", {}), "final_loss": m.get("train", {}).get("final_loss")}
        for role, m in report["runs"][0]["models"].items()
        if role != "teacher"
    }


SHORT_EPOCHS = ("data.train_limit=100", "training.batch_size=32")


def kd_recipe(out, teacher, *extra):
    return tiny("digits_kd", out, f"teacher.model={teacher}", "training.steps=20", *extra)


def test_same_seed_same_result(tmp_path, digits_teacher):
    a = run_recipe(kd_recipe(tmp_path / "a", digits_teacher))
    b = run_recipe(kd_recipe(tmp_path / "b", digits_teacher))
    assert metrics_of(a) == metrics_of(b)


def test_crash_then_resume_matches_an_uninterrupted_run(tmp_path, digits_teacher, monkeypatch):
    # 4 batches an epoch: the checkpoint at step 10 is in the middle of the third epoch
    reference = run_recipe(kd_recipe(tmp_path / "ref", digits_teacher, *SHORT_EPOCHS))

    original = Objective.__call__

    def crash_at_step_13(self, student, teacher, batch, step):
        if step == 13:
            raise RuntimeError("simulated crash")
        return original(self, student, teacher, batch, step)

    recipe = kd_recipe(tmp_path / "crash", digits_teacher, *SHORT_EPOCHS)
    monkeypatch.setattr(Objective, "__call__", crash_at_step_13)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe(recipe)
    ckpts = list_checkpoints(recipe.run_dir / "checkpoints" / "student")
    assert [p.name for p in ckpts] == ["step-0000005", "step-0000010"]
    monkeypatch.setattr(Objective, "__call__", original)

    resumed = run_recipe(recipe, resume=True)
    assert resumed["runs"][0]["models"]["student"]["train"]["resumed_from"] == 10
    assert metrics_of(resumed) == metrics_of(reference)
    # the metrics log has each step once, as an uninterrupted run would
    steps = [
        r["step"]
        for r in map(json.loads, (recipe.run_dir / "metrics.jsonl").read_text().splitlines())
        if r["phase"] == "student" and "loss" in r
    ]
    assert steps == sorted(set(steps))


def test_gradient_accumulation_matches_a_larger_batch(tmp_path, digits_teacher):
    common = [
        "training.optimizer.name=sgd",
        "training.optimizer.momentum=0",
        "training.max_grad_norm=null",
        "data.train_limit=64",
    ]
    big = run_recipe(kd_recipe(tmp_path / "big", digits_teacher, "training.batch_size=16", *common))
    acc = run_recipe(
        kd_recipe(
            tmp_path / "acc", digits_teacher, "training.batch_size=8", "training.gradient_accumulation=2", *common
        )
    )
    for role in ("student", "baseline"):
        a, b = metrics_of(big)[role], metrics_of(acc)[role]
        assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-4)
        assert a["accuracy"] == pytest.approx(b["accuracy"], abs=1 / 450 + 1e-9)


def test_an_existing_run_is_never_overwritten_silently(tmp_path, digits_teacher):
    recipe = kd_recipe(tmp_path, digits_teacher)
    run_recipe(recipe)
    with pytest.raises(RunDirError, match="already holds a run"):
        run_recipe(recipe)
    with pytest.raises(RunDirError, match="differs from this recipe"):
        run_recipe(kd_recipe(tmp_path, digits_teacher, "training.lr=0.5"), resume=True)
    with pytest.raises(RunDirError, match="nothing to resume"):
        run_recipe(kd_recipe(tmp_path / "other", digits_teacher), resume=True)


def test_unsafe_checkpoint_is_refused(tmp_path, digits_teacher, monkeypatch):
    recipe = kd_recipe(tmp_path, digits_teacher)
    original = Objective.__call__

    def crash(self, s, t, batch, step):
        if step == 7:
            raise RuntimeError("boom")
        return original(self, s, t, batch, step)

    monkeypatch.setattr(Objective, "__call__", crash)
    with pytest.raises(RuntimeError):
        run_recipe(recipe)
    monkeypatch.setattr(Objective, "__call__", original)
    ckpt = list_checkpoints(recipe.run_dir / "checkpoints" / "student")[-1]

    class Exploit:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    import pickle

    (ckpt / "optimizer.pt").write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        run_recipe(recipe, resume=True)


def test_lr_schedules():
    assert [lr_factor("constant", 2, 10, s) for s in range(3)] == [0.5, 1.0, 1.0]
    assert lr_factor("linear", 0, 10, 5) == pytest.approx(0.5)
    assert lr_factor("cosine", 0, 10, 10) == pytest.approx(0.0)


def _kdforge(*args, cwd):
    env = {**os.environ, "KDFORGE_PROGRESS": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "kdforge", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_process_resumes_to_the_same_metrics(tmp_path, digits_teacher, sig):
    args = [
        "run",
        "digits_kd",
        "--set",
        f"teacher.model={digits_teacher}",
        "--set",
        "training.epochs=null",
        "--set",
        "training.steps=1500",
        "--set",
        "training.checkpoint_every=100",
        "--set",
        "evaluation.throughput_batches=1",
        "--set",
        "evaluation.throughput_repeats=1",
        "--set",
        "evaluation.baseline=false",
        "--set",
        "data.train_limit=200",
    ]
    ref = _kdforge(*args, "--set", "output.dir=ref", cwd=tmp_path)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()

    proc = _kdforge(*args, "--set", "output.dir=killed", cwd=tmp_path)
    ckpt_dir = tmp_path / "killed" / "digits-kd" / "checkpoints" / "student"
    deadline = time.time() + 120
    while not list_checkpoints(ckpt_dir) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    proc.send_signal(sig)
    code = proc.wait(timeout=60)
    if sig == signal.SIGTERM:
        assert code == 143
        assert "checkpoint saved" in proc.stderr.read()
    else:
        assert code == -signal.SIGKILL
    assert list_checkpoints(ckpt_dir)

    resumed = _kdforge(*args, "--set", "output.dir=killed", "--resume", cwd=tmp_path)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a = json.loads((tmp_path / "ref" / "digits-kd" / "report.json").read_text())
    b = json.loads((tmp_path / "killed" / "digits-kd" / "report.json").read_text())
    assert b["runs"][0]["models"]["student"]["train"]["resumed_from"] > 0
    assert metrics_of(a) == metrics_of(b)


def test_bf16_training_with_a_bfloat16_teacher(tmp_path, digits_teacher):
    recipe = kd_recipe(tmp_path, digits_teacher, "training.precision=bf16", "teacher.dtype=bfloat16")
    report = run_recipe(recipe)
    assert report["summary"]["student"]["metrics"]["accuracy"]["mean"] > 0
