"""Several processes: `accelerate launch` on the CPU (gloo, 2 processes) gives the run of one process.

``training.batch_size`` is the global batch, so the same recipe and seed must give the
same losses, metrics and weights on 1 and 2 processes (within 1e-5: float sums in
another order), and a checkpoint written by one process continues under two.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from conftest import TINY

BIN = Path(sys.executable).parent
TOLERANCE = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(processes: int) -> list[str]:
    """The README's command: ``accelerate launch`` on this machine's CPUs, or plain Python for one process.

    ``--multi_gpu`` is Accelerate's name for its torchrun launcher; without a GPU its processes
    join a gloo group on the CPU (``--cpu`` alone would start a single process).
    """
    if processes == 1:
        return [sys.executable, "-m", "kdforge"]
    return [
        str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "kdforge",
    ]  # fmt: skip


def kdforge(processes: int, *args: str, env: dict[str, str] | None = None, check: bool = True):
    env = {**os.environ, "KDFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run(
        [*launch_command(processes), *args], env=env, capture_output=True, text=True, timeout=600
    )
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=TOLERANCE, abs_tol=TOLERANCE)


def assert_same_run(one: Path, two: Path) -> None:
    """Losses, terms and test metrics of every trained model, the logged curve, and the weights."""
    reports = [json.loads((d / "report.json").read_text())["runs"][0]["models"] for d in (one, two)]
    assert set(reports[0]) == set(reports[1])
    for role, a in reports[0].items():
        b = reports[1][role]
        for name, value in a["metrics"].items():
            assert close(value, b["metrics"][name]), f"{role} {name}: {value} vs {b['metrics'][name]}"
        if "train" in a and "final_loss" in a["train"]:
            assert a["train"]["steps"] == b["train"]["steps"]
            assert close(a["train"]["final_loss"], b["train"]["final_loss"]), role
            for term, value in a["train"]["final_terms"].items():
                assert close(value, b["train"]["final_terms"][term]), f"{role} {term}"
    logs = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    assert [(r["phase"], r["step"]) for r in logs[0]] == [(r["phase"], r["step"]) for r in logs[1]]  # no duplicates
    for a, b in zip(*logs):
        for key in ("loss", "lr"):
            if key in a:
                assert close(a[key], b[key]), f"{a['phase']} step {a['step']} {key}: {a[key]} vs {b[key]}"
        for name, value in a.get("eval", {}).items():
            assert close(value, b["eval"][name]), f"{a['phase']} step {a['step']} {name}"
    for folder in ("model", "baseline"):
        files = sorted((one / folder).glob("*.safetensors"))
        assert files, f"no weights in {one / folder}"
        for file in files:
            a, b = load_file(file), load_file(two / folder / file.name)
            for name, tensor in a.items():
                assert torch.allclose(tensor, b[name], atol=TOLERANCE), f"{folder}/{file.name}: {name}"


def _digits_kd(teacher: Path, out: Path, name: str, *extra: str) -> list[str]:
    # 97 examples in global batches of 16: the last batch of each epoch has 1 example, so the
    # second process gets a stand-in there; accumulation over 2 batches crosses that batch too
    settings = [
        *TINY, "training.steps=14", "training.batch_size=16", "training.gradient_accumulation=2",
        "training.eval_every=5", "data.train_limit=97", f"teacher.model={teacher}", f"output.dir={out}",
        f"output.name={name}", *extra,
    ]  # fmt: skip
    return ["run", "digits_kd", *(arg for s in settings for arg in ("--set", s))]


def test_two_processes_give_the_run_of_one_with_the_same_global_batch(tmp_path, digits_teacher):
    kdforge(1, *_digits_kd(digits_teacher, tmp_path, "one"))
    done = kdforge(2, *_digits_kd(digits_teacher, tmp_path, "two"))
    assert done.stdout.count("report:") == 1, "only the main process prints the summary"
    assert_same_run(tmp_path / "one", tmp_path / "two")
    files = {str(p.relative_to(tmp_path / "two")) for p in (tmp_path / "two").rglob("*") if p.is_file()}
    assert files == {str(p.relative_to(tmp_path / "one")) for p in (tmp_path / "one").rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith(".tmp") or f.startswith("checkpoints/")]


def test_a_checkpoint_written_by_one_process_continues_under_two(tmp_path, digits_teacher):
    kdforge(1, *_digits_kd(digits_teacher, tmp_path, "whole"))
    # killed (SIGKILL) in step 8 of the student, after the checkpoint of step 5
    killed = kdforge(1, *_digits_kd(digits_teacher, tmp_path, "resumed"), env={"KDFORGE_FAULT": "step@8"}, check=False)
    assert killed.returncode != 0
    assert (tmp_path / "resumed" / "checkpoints" / "student" / "step-0000005").is_dir()
    kdforge(2, *_digits_kd(digits_teacher, tmp_path, "resumed"), "--resume")
    report = json.loads((tmp_path / "resumed" / "report.json").read_text())
    assert report["runs"][0]["models"]["student"]["train"]["resumed_from"] == 5
    assert_same_run(tmp_path / "whole", tmp_path / "resumed")
