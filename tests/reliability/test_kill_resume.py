"""Kill a run at chosen points (kill -9, SIGTERM, SIGINT), resume it, and compare with a run never stopped.

Each run is a real ``kdforge run`` process. ``KDFORGE_FAULT`` (kdforge/faults.py) makes the
process SIGKILL itself at an exact point: in the middle of an optimizer step, between two files of
a checkpoint, during an evaluation, after a model is written but before it is moved into place.
A last case kills from outside at random instants. After ``--resume`` the student's and the
baseline's weights must equal, bit for bit, those of the uninterrupted run with the same seed
(``training.deterministic: true``, on the CPU), and so must every reported metric.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kdforge.engine.checkpoint import list_checkpoints

#: 200 training examples in batches of 32: 7 batches an epoch, so checkpoints (every 10 steps) fall
#: mid-epoch; evaluation every 15 steps, 60 steps in all, then a labels-only baseline of 60 steps
RUN = [
    "training.epochs=null",
    "training.steps=60",
    "training.batch_size=32",
    "training.checkpoint_every=10",
    "training.eval_every=15",
    "training.log_every=5",
    "training.deterministic=true",
    "data.train_limit=200",
    "evaluation.throughput_batches=1",
    "evaluation.throughput_repeats=1",
]
NAME = "digits-kd"


def _command(teacher: Path, out: str, *more: str) -> list[str]:
    sets = [x for s in (*RUN, f"teacher.model={teacher}", f"output.dir={out}") for x in ("--set", s)]
    return [sys.executable, "-m", "kdforge", "run", "digits_kd", *sets, *more]


def _start(cmd: list[str], cwd: Path, fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "KDFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    env.pop("KDFORGE_FAULT", None)
    if fault:
        env["KDFORGE_FAULT"] = fault
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def _weights(run_dir: Path) -> dict[str, dict]:
    return {role: load_file(str(run_dir / role / "model.safetensors")) for role in ("model", "baseline")}


def _metrics(run_dir: Path) -> dict:
    report = json.loads((run_dir / "report.json").read_text())
    return {
        role: {**m["metrics"], **m.get("fidelity", {}), "final_loss": m["train"]["final_loss"]}
        for role, m in report["runs"][0]["models"].items()
        if role != "teacher"
    }


def _assert_same_as_reference(reference: Path, run_dir: Path) -> None:
    ref, got = _weights(reference), _weights(run_dir)
    for role in ref:
        assert ref[role].keys() == got[role].keys()
        for name in ref[role]:
            # bitwise: torch.equal, not allclose
            assert ref[role][name].equal(got[role][name]), f"{role}/{name} differs from the uninterrupted run"
    assert _metrics(run_dir) == _metrics(reference)
    steps = [
        r["step"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["phase"] == "student" and "loss" in r
    ]
    assert steps == list(range(5, 61, 5)), "each logged step once, as in an uninterrupted run"
    assert not list((run_dir / "checkpoints").rglob("*.tmp")), "no half-written checkpoint is left behind"


@pytest.fixture(scope="module")
def reference(digits_teacher, tmp_path_factory) -> tuple[Path, Path]:
    """The uninterrupted run: (its folder, the teacher it used)."""
    cwd = tmp_path_factory.mktemp("reference")
    code, err = _finish(_start(_command(digits_teacher, "ref"), cwd))
    assert code == 0, err
    return cwd / "ref" / NAME, digits_teacher


#: (fault, what must be on disk when the process has died)
KILL_POINTS = [
    pytest.param("step@23", "student", id="mid-step"),
    pytest.param("checkpoint@20", "half-checkpoint", id="mid-checkpoint-write"),
    pytest.param("eval@30", "student", id="mid-evaluation"),
    pytest.param("save_model", "student-saved-not-moved", id="mid-model-save"),
    # both phases done and saved: --resume must report them as they were (not from the metrics log)
    pytest.param("report", "both-saved-no-report", id="before-the-report"),
]


@pytest.mark.parametrize(("fault", "expect"), KILL_POINTS)
def test_kill_9_then_resume_gives_bitwise_the_same_weights(reference, tmp_path, fault, expect):
    ref_dir, teacher = reference
    code, err = _finish(_start(_command(teacher, "out"), tmp_path, fault=fault))
    assert code == -signal.SIGKILL, err
    run_dir = tmp_path / "out" / NAME
    ckpts = run_dir / "checkpoints" / "student"
    if expect == "half-checkpoint":
        # the checkpoint being written stays under its temporary name; the newest whole one is step 10
        assert (ckpts / ".step-0000020.tmp").is_dir()
        assert [p.name for p in list_checkpoints(ckpts)] == ["step-0000010"]
    elif expect == "both-saved-no-report":
        assert (run_dir / "model").is_dir() and (run_dir / "baseline").is_dir()
        assert not (run_dir / "report.json").exists()
    elif expect == "student-saved-not-moved":
        # the student was written to model.tmp and not yet moved: no model folder to mistake for a finished one
        assert (run_dir / "model.tmp").is_dir() and not (run_dir / "model").exists()
    else:
        assert list_checkpoints(ckpts)

    code, err = _finish(_start(_command(teacher, "out", "--resume"), tmp_path))
    assert code == 0, err
    _assert_same_as_reference(ref_dir, run_dir)


def test_killed_again_during_the_resumed_run(reference, tmp_path):
    """Two kills in a row (mid-step, then mid-checkpoint of the resumed run), then a resume."""
    ref_dir, teacher = reference
    assert _finish(_start(_command(teacher, "out"), tmp_path, fault="step@13"))[0] == -signal.SIGKILL
    resumed = _start(_command(teacher, "out", "--resume"), tmp_path, fault="checkpoint@40")
    assert _finish(resumed)[0] == -signal.SIGKILL
    code, err = _finish(_start(_command(teacher, "out", "--resume"), tmp_path))
    assert code == 0, err
    _assert_same_as_reference(ref_dir, tmp_path / "out" / NAME)


def _stop_after_first_checkpoint(proc: subprocess.Popen, ckpts: Path, sig: signal.Signals) -> None:
    deadline = time.time() + 120
    while not list_checkpoints(ckpts) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(sig)


@pytest.mark.parametrize(("sig", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "SIGINT"])
def test_sigterm_and_sigint_stop_cleanly_and_resume_bitwise(reference, tmp_path, sig, exit_code):
    """Stopped by a signal (in training, it saves a checkpoint first; elsewhere finished work is kept):
    one line, exit 128 + the signal's number, and --resume ends where an uninterrupted run ends."""
    ref_dir, teacher = reference
    proc = _start(_command(teacher, "out"), tmp_path)
    _stop_after_first_checkpoint(proc, tmp_path / "out" / NAME / "checkpoints" / "student", sig)
    code, err = _finish(proc)
    assert code == exit_code, err
    assert err.startswith("stopped: stopped by " + sig.name) and "--resume" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    code, err = _finish(_start(_command(teacher, "out", "--resume"), tmp_path))
    assert code == 0, err
    _assert_same_as_reference(ref_dir, tmp_path / "out" / NAME)


def test_a_signal_during_training_saves_a_checkpoint_at_that_step(reference, tmp_path):
    """SIGTERM inside the training loop: the step in hand ends, a checkpoint of it is written."""
    ref_dir, teacher = reference
    # a long student phase (checkpoints far apart), so the signal surely lands inside the loop
    longer = ["training.steps=3000", "training.checkpoint_every=1000", "training.eval_every=null",
              "evaluation.baseline=false"]  # fmt: skip
    proc = _start(_command(teacher, "out", *[x for s in longer for x in ("--set", s)]), tmp_path)
    log = tmp_path / "out" / NAME / "metrics.jsonl"
    deadline = time.time() + 120
    while not (log.exists() and log.read_text().strip()) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    code, err = _finish(proc)
    assert code == 143, err
    assert "at step" in err and "checkpoint saved in" in err
    saved = list_checkpoints(tmp_path / "out" / NAME / "checkpoints" / "student")
    assert saved and 0 < int(saved[-1].name.split("-")[1]) < 3000


def test_kill_9_at_random_instants(reference, tmp_path):
    """From outside, at seeded random instants: wherever the kills land, the resumed run ends the same."""
    ref_dir, teacher = reference
    rng = random.Random(9)
    killed = 0
    for attempt in range(3):
        proc = _start(_command(teacher, "out", *(["--resume"] if attempt else [])), tmp_path)
        time.sleep(rng.uniform(3.0, 8.0))  # the imports take a few seconds; a run about 10-20 s
        if proc.poll() is None:
            proc.kill()
            killed += 1
        _finish(proc)
    assert killed >= 1
    code, err = _finish(_start(_command(teacher, "out", "--resume"), tmp_path))
    if code != 0 and "nothing to resume" in err:  # every kill landed before the run folder was made
        code, err = _finish(_start(_command(teacher, "out"), tmp_path))
    assert code == 0, err
    _assert_same_as_reference(ref_dir, tmp_path / "out" / NAME)
