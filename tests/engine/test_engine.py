import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import crash_at_step, tiny
from kdforge.engine.checkpoint import (
    LOSS_MODULES_FILE,
    TrainState,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from kdforge.engine.optim import lr_factor
from kdforge.errors import CheckpointError, RecipeError, RunDirError
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

    recipe = kd_recipe(tmp_path / "crash", digits_teacher, *SHORT_EPOCHS)
    crash_at_step(recipe, 13, monkeypatch)
    ckpts = list_checkpoints(recipe.run_dir / "checkpoints" / "student")
    assert [p.name for p in ckpts] == ["step-0000005", "step-0000010"]

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
    crash_at_step(recipe, 7, monkeypatch)
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


def _long_run(teacher: Path) -> list[str]:
    """A digits run long enough to be killed after its first checkpoint (step 100 of 1500)."""
    sets = [
        f"teacher.model={teacher}", "training.epochs=null", "training.steps=1500", "training.checkpoint_every=100",
        "evaluation.throughput_batches=1", "evaluation.throughput_repeats=1", "evaluation.baseline=false",
        "data.train_limit=200",
    ]  # fmt: skip
    return ["run", "digits_kd", *(a for s in sets for a in ("--set", s))]


@pytest.fixture(scope="module")
def uninterrupted_long_run(digits_teacher, tmp_path_factory) -> Path:
    """The report of the long run never stopped (one for both signals)."""
    cwd = tmp_path_factory.mktemp("uninterrupted")
    ref = _kdforge(*_long_run(digits_teacher), "--set", "output.dir=ref", cwd=cwd)
    assert ref.wait(timeout=300) == 0, ref.stderr.read()
    return cwd / "ref" / "digits-kd" / "report.json"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_process_resumes_to_the_same_metrics(tmp_path, digits_teacher, uninterrupted_long_run, sig):
    args = _long_run(digits_teacher)
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
    a = json.loads(uninterrupted_long_run.read_text())
    b = json.loads((tmp_path / "killed" / "digits-kd" / "report.json").read_text())
    assert b["runs"][0]["models"]["student"]["train"]["resumed_from"] > 0
    assert metrics_of(a) == metrics_of(b)


def test_bf16_training_with_a_bfloat16_teacher(tmp_path, digits_teacher):
    recipe = kd_recipe(tmp_path, digits_teacher, "training.precision=bf16", "teacher.dtype=bfloat16")
    report = run_recipe(recipe)
    assert report["summary"]["student"]["metrics"]["accuracy"]["mean"] > 0


# ----- learnable loss terms -------------------------------------------------------

MI_ALPHA_TERM = (
    "objective[1].loss=mi_alpha",
    "objective[1].field=hidden",
    "objective[1].params={student_dim: 16, teacher_dim: 64, alpha: 0.5}",
)
DAC_KL_TERM = ("objective[1].loss=dac_kl", "objective[1].params={temperature: 2.0}")
NO_BASELINE = "evaluation.baseline=false"


@pytest.fixture
def objectives(monkeypatch):
    """Every Objective built from now on, with a copy of its loss modules' initial weights."""
    built = []
    original = Objective.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        built.append((self, {k: v.clone() for k, v in self.loss_modules().state_dict().items()}))

    monkeypatch.setattr(Objective, "__init__", init)
    return built


@pytest.mark.parametrize("term", [MI_ALPHA_TERM, DAC_KL_TERM], ids=["mi_alpha", "dac_kl"])
def test_a_loss_module_term_trains_its_parameters(tmp_path, digits_teacher, objectives, term):
    report = run_recipe(kd_recipe(tmp_path, digits_teacher, "training.steps=12", NO_BASELINE, *term))
    train = report["runs"][0]["models"]["student"]["train"]
    assert math.isfinite(train["final_loss"])
    assert set(train["final_terms"]) == {"cross_entropy", term[0].split("=")[1]}
    assert all(math.isfinite(v) for v in train["final_terms"].values())
    objective, initial = objectives[-1]  # the run's (the memory plan builds one of its own first)
    final = objective.loss_modules().state_dict()
    assert initial and set(final) == set(initial)
    unchanged = [name for name in initial if torch.equal(initial[name], final[name].cpu())]
    assert not unchanged, f"not trained: {unchanged}"


def test_a_run_with_a_loss_module_resumes_to_the_same_weights(tmp_path, digits_teacher, objectives, monkeypatch):
    # a critic with random initial weights (the MLP one): the resumed run must load them, not rebuild them
    term = (*MI_ALPHA_TERM[:2], "objective[1].params={student_dim: 16, teacher_dim: 64, critic: mlp, hidden: 8}")
    extra = (*SHORT_EPOCHS, NO_BASELINE, *term)
    reference = run_recipe(kd_recipe(tmp_path / "ref", digits_teacher, *extra))
    reference_modules = objectives[-1][0].loss_modules().state_dict()

    recipe = kd_recipe(tmp_path / "crash", digits_teacher, *extra)
    crash_at_step(recipe, 13, monkeypatch)
    latest = list_checkpoints(recipe.run_dir / "checkpoints" / "student")[-1]
    assert latest.name == "step-0000010" and (latest / LOSS_MODULES_FILE).is_file()

    resumed = run_recipe(recipe, resume=True)
    assert resumed["runs"][0]["models"]["student"]["train"]["resumed_from"] == 10
    assert metrics_of(resumed) == metrics_of(reference)
    resumed_modules = objectives[-1][0].loss_modules().state_dict()
    assert set(resumed_modules) == set(reference_modules)
    for name, value in reference_modules.items():
        assert torch.equal(resumed_modules[name], value), name
    students = [load_file(d / "model" / "model.safetensors") for d in (tmp_path / "ref" / "digits-kd", recipe.run_dir)]
    assert students[0].keys() == students[1].keys()
    assert all(torch.equal(students[0][k], students[1][k]) for k in students[0])


def test_a_checkpoint_without_the_loss_module_weights_is_refused(tmp_path, digits_teacher, monkeypatch):
    recipe = kd_recipe(tmp_path, digits_teacher, NO_BASELINE, *MI_ALPHA_TERM)
    crash_at_step(recipe, 7, monkeypatch)
    ckpt = list_checkpoints(recipe.run_dir / "checkpoints" / "student")[-1]
    (ckpt / LOSS_MODULES_FILE).unlink()  # as a checkpoint written before loss modules were trained
    with pytest.raises(CheckpointError, match=r"has no weights for the objective's learnable loss terms"):
        run_recipe(recipe, resume=True)


def test_checkpoints_hold_loss_modules_only_when_the_objective_has_them(tmp_path):
    model, modules = torch.nn.Linear(3, 2), torch.nn.ModuleDict({"objective[1]": torch.nn.Linear(2, 2)})
    optimizer = torch.optim.AdamW([{"params": model.parameters()}, {"params": modules.parameters()}])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    common = {"model": model, "optimizer": optimizer, "scheduler": scheduler}
    with_modules = save_checkpoint(tmp_path / "a", state=TrainState(step=3), keep=1, loss_modules=modules, **common)
    plain = save_checkpoint(tmp_path / "b", state=TrainState(step=3), keep=1, loss_modules=None, **common)
    assert (with_modules / LOSS_MODULES_FILE).is_file() and not (plain / LOSS_MODULES_FILE).exists()

    fresh = torch.nn.ModuleDict({"objective[1]": torch.nn.Linear(2, 2)})
    load_checkpoint(with_modules, loss_modules=fresh, **common)
    assert all(torch.equal(a, b) for a, b in zip(fresh.parameters(), modules.parameters()))
    # a plain objective's checkpoint (also every one written before loss modules) loads as before
    assert load_checkpoint(plain, loss_modules=torch.nn.ModuleDict(), **common).step == 3
    with pytest.raises(CheckpointError, match="holds weights of learnable loss terms, but this objective has none"):
        load_checkpoint(with_modules, loss_modules=None, **common)
    with pytest.raises(CheckpointError, match="loss-module weights do not fit the objective's terms"):
        load_checkpoint(
            with_modules, loss_modules=torch.nn.ModuleDict({"objective[2]": torch.nn.Linear(2, 2)}), **common
        )


def test_a_feature_size_the_term_does_not_expect_stops_the_run_at_the_first_batch(tmp_path, digits_teacher):
    recipe = kd_recipe(
        tmp_path,
        digits_teacher,
        NO_BASELINE,
        *MI_ALPHA_TERM[:2],
        "objective[1].params={student_dim: 32, teacher_dim: 64}",
    )
    with pytest.raises(RecipeError) as info:
        run_recipe(recipe)
    assert str(info.value) == (
        "objective[1].params.student_dim: 'mi_alpha' was built for student_dim=32,"
        " but the student's 'hidden' has size 16; set student_dim: 16"
    )


_DDP_SCRIPT = """
import os, sys
from pathlib import Path

import torch
from accelerate.state import PartialState

PartialState(cpu=True)  # before the engine's Accelerator, so that torchrun's processes form a gloo group
from torch import nn

from kdforge.engine.trainer import train
from kdforge.recipe import TrainingConfig

batch_size, out = int(sys.argv[1]), Path(sys.argv[2])
torch.manual_seed(0)
data = [{"x": x, "y": y} for x, y in zip(torch.randn(64, 5), torch.randn(64, 3))]
model = nn.Linear(5, 3)
critic = nn.ModuleDict({"objective[1]": nn.Linear(3, 3)})


def loss_fn(m, batch, step):
    loss = ((critic["objective[1]"](m(batch["x"])) - batch["y"]) ** 2).mean()
    return loss, {"mse": loss.detach()}


cfg = TrainingConfig(steps=6, batch_size=batch_size, device="cpu", max_grad_norm=0.5, optimizer={"name": "sgd"})
rank = PartialState().process_index
collate = lambda items: {k: torch.stack([it[k] for it in items]) for k in items[0]}
train(model, data, collate, loss_fn, cfg, phase="p", run_dir=out / f"run-{rank}", loss_modules=critic)
torch.save({"model": model.state_dict(), "critic": critic.state_dict()}, out / f"weights-{rank}.pt")
"""


@pytest.mark.slow
def test_loss_modules_under_ddp_match_one_process_with_the_same_global_batch(tmp_path):
    script = tmp_path / "ddp_loss_modules.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "KDFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), "16"]
    two, one = tmp_path / "two", tmp_path / "one"
    for args, folder in (([*launch, str(two)], two), ([sys.executable, str(script), "16", str(one)], one)):
        folder.mkdir()
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1, single = (
        torch.load(p, weights_only=True) for p in (two / "weights-0.pt", two / "weights-1.pt", one / "weights-0.pt")
    )
    for part in ("model", "critic"):
        for name, value in rank0[part].items():
            assert torch.equal(value, rank1[part][name]), f"{part}.{name} differs between processes"
            assert torch.allclose(value, single[part][name], atol=1e-6), f"{part}.{name} differs from one process"
