"""``training.sharding: fsdp`` (issue 22): the student and the online teacher sharded with FSDP2 over 2 CPU
processes (gloo) train as one unsharded process does (1e-5), hold half the weights, gradients and optimizer
state each, write DCP checkpoints that a killed run resumes from on 2 or on 1 process, and save an ordinary
transformers folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from test_processes import assert_same_run, kdforge
from tiny_lm import TEXT

FSDP = ["--set", "training.sharding=fsdp"]


def _recipe(folder: Path, teacher: Path) -> Path:
    text = folder / "text.txt"
    text.write_text(TEXT * 4)
    recipe = {
        "name": "tiny-lm",
        "task": "causal_lm",
        "teacher": {"model": str(teacher)},
        "student": {"from_teacher": {"layers": [0, 3]}},
        "data": {"format": "text", "path": str(text), "max_length": 16},
        "objective": [{"loss": "forward_kl", "weight": 1.0}, {"loss": "cross_entropy", "weight": 0.1}],
        # checkpoints at 3 and 6, an evaluation at 4 (every process takes part when sharded)
        "training": {"lr": 3e-3, "batch_size": 8, "steps": 8, "log_every": 1, "checkpoint_every": 3, "eval_every": 4},
        "evaluation": {"batch_size": 8, "throughput_batches": 1, "throughput_repeats": 1, "baseline": False},
        # float32 on disk: saving in bfloat16 rounds the 1e-7 differences of a sharded run to whole ulps
        "output": {"dir": str(folder / "runs"), "dtype": "float32"},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, tiny_lm_teacher):
    """The recipe, and its run on one process without sharding: what every sharded run must give."""
    folder = tmp_path_factory.mktemp("sharding")
    recipe = _recipe(folder, tiny_lm_teacher)
    kdforge(1, "run", str(recipe), "--set", "output.name=whole")
    return recipe, folder / "runs"


def _train_info(run: Path) -> dict:
    return json.loads((run / "model.train.json").read_text())


def test_a_sharded_run_on_two_processes_gives_the_unsharded_run_and_half_the_memory_each(whole_run):
    recipe, runs = whole_run
    kdforge(2, "run", str(recipe), "--set", "output.name=sharded", *FSDP)
    assert_same_run(runs / "whole", runs / "sharded")  # losses, evaluations, test metrics, saved weights (1e-5)
    info, whole = _train_info(runs / "sharded"), _train_info(runs / "whole")
    assert info["sharded"] == {"student": True, "teacher": True}
    # its test metrics (equal to the unsharded run's above) came from the sharded student, both processes taking part
    report = json.loads((runs / "sharded" / "report.json").read_text())
    assert report["runs"][0]["models"]["student"]["tested_sharded"] is True
    for part in ("weights", "gradients", "optimizer"):  # 8 blocks' and the root's parameters split in two
        assert info["held_bytes_per_process"][part] == pytest.approx(
            whole["held_bytes_per_process"][part] / 2, rel=0.01
        )
    # kdforge plan learns sharding: its per-process estimate of what the run held, within 25%
    from kdforge.checks import load_recipe
    from kdforge.plan import plan_recipe

    plan = plan_recipe(load_recipe(str(recipe), ["training.sharding=fsdp"]), processes=2)
    held = info["held_bytes_per_process"]
    for part, estimate in (
        ("weights", plan.student_weights),
        ("gradients", plan.gradients),
        ("optimizer", plan.optimizer_state),
    ):
        assert estimate == pytest.approx(held[part], rel=0.25), part
    assert plan.gathered > 0
    # the saved student is an ordinary transformers folder holding the gathered weights
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs / "sharded" / "model")
    saved = load_file(runs / "sharded" / "model" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        if name in saved:
            assert torch.equal(tensor, saved[name]), name


def test_a_run_killed_in_a_sharded_checkpoint_resumes_on_two_processes_and_on_one(whole_run):
    recipe, runs = whole_run
    killed = kdforge(
        2, "run", str(recipe), "--set", "output.name=on2", *FSDP, env={"KDFORGE_FAULT": "checkpoint@6"}, check=False
    )
    assert killed.returncode != 0
    kept = sorted(p.name for p in (runs / "on2" / "checkpoints" / "student").iterdir())
    assert kept == [".step-0000006.tmp", "step-0000003"]  # the half-written one never took a step-* name
    assert (runs / "on2" / "checkpoints" / "student" / "step-0000003" / "dcp").is_dir()
    # the same killed run, twice: one copy resumes on two processes, the other on one
    shutil.copytree(runs / "on2", runs / "on1")
    saved = runs / "on1" / "recipe.yaml"
    saved.write_text(saved.read_text().replace("name: on2", "name: on1"))
    kdforge(2, "run", str(recipe), "--set", "output.name=on2", *FSDP, "--resume")
    kdforge(1, "run", str(recipe), "--set", "output.name=on1", *FSDP, "--resume")
    for name in ("on2", "on1"):
        assert _train_info(runs / name)["resumed_from"] == 3
        assert_same_run(runs / "whole", runs / name)


@pytest.mark.slow  # four launches of two processes (about a minute); make test-all runs it
def test_a_sharded_encoder_trains_as_the_unsharded_one_on_two_processes(tmp_path):
    """MiniLM's attention and value relations through a sentence-transformers student sharded per BERT layer:
    the same run as data parallel on two processes (dropout draws the same on each process in both)."""
    from test_processes import _needs

    _needs("scifact", "corpus.jsonl")
    settings = [
        "training.epochs=null", "training.steps=4", "training.log_every=1", "training.batch_size=8",
        "evaluation.throughput_batches=1", "evaluation.throughput_repeats=1", "evaluation.baseline=false",
        "data.max_length=32", "data.test.query_limit=6", "data.test.corpus_limit=40", "data.train_limit=16",
        "data.test.wikiqa_limit=4", f"output.dir={tmp_path}",
    ]  # fmt: skip
    args = ["run", "embedding_minilm_l6_to_l3", *(a for s in settings for a in ("--set", s))]
    kdforge(2, *args, "--set", "output.name=replicated")
    kdforge(2, *args, "--set", "output.name=sharded", *FSDP)
    for run in ("replicated", "sharded"):  # query latencies are timings, not results
        report = json.loads((tmp_path / run / "report.json").read_text())
        for model in report["runs"][0]["models"].values():
            model["metrics"] = {k: v for k, v in model["metrics"].items() if not k.endswith("_ms")}
        (tmp_path / run / "report.json").write_text(json.dumps(report))
    assert_same_run(tmp_path / "replicated", tmp_path / "sharded")


_SAMPLE_SCRIPT = """
import copy, sys, torch
from kdforge.distributed import leave_processes, rank, start_processes
start_processes(True)
from transformers import AutoModelForCausalLM
from kdforge.data.generate import sample_continuations
from kdforge.engine.sharding import shard
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
whole = copy.deepcopy(model)
shard(model, torch.device("cpu"))
# each process its own prompts and answer length: the one done first keeps stepping with the other
prompts = [[5, 6, 7, 8], [9, 10]] if rank() == 0 else [[11, 12, 13], [14]]
for temperature in (0.0, 1.0):
    settings = dict(pad_id=0, stop_ids=[2], max_new_tokens=6 + 4 * rank(), temperature=temperature, seed=3)
    assert sample_continuations(model, prompts, **settings) == sample_continuations(whole, prompts, **settings)
open(sys.argv[2] + f"-{rank()}", "w").write("same")
leave_processes(together=True)
"""


def test_a_sharded_student_samples_what_the_whole_one_samples(tmp_path, tiny_lm_teacher):
    """On-policy distillation has a sharded student write: every process takes every decoding step
    (transformers' synced_gpus) until the longest answer of any process is done."""
    import os

    from conftest import launch, run_launched

    script = tmp_path / "sample.py"
    script.write_text(_SAMPLE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = run_launched([*launch(2), str(script), str(tiny_lm_teacher), str(tmp_path / "ok")], env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ok-0").read_text() == (tmp_path / "ok-1").read_text() == "same"


@pytest.mark.slow  # two launches of two processes; make test-all runs it
def test_on_policy_distillation_runs_with_student_and_teacher_sharded(whole_run, tmp_path):
    recipe, _ = whole_run
    prompts = [f"To be or not {i}, that is the question" for i in range(24)]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "response": "yes"}) + "\n" for p in prompts))
    data = f"data={{format: jsonl, path: {pairs}, max_length: 32}}"
    settings = [data, "generation.max_new_tokens=8", "methods=[{name: on_policy, lmbda: 1.0}]", "training.steps=4",
                f"output.dir={tmp_path}", "output.name=on_policy", "training.sharding=fsdp"]  # fmt: skip
    kdforge(2, "run", str(recipe), *(a for s in settings for a in ("--set", s)))
    info = _train_info(tmp_path / "on_policy")
    assert info["sharded"] == {"student": True, "teacher": True}
    assert info["on_policy_steps"] == 4
    report = json.loads((tmp_path / "on_policy" / "report.json").read_text())
    assert report["runs"][0].get("samples")  # the teacher, whole again, wrote the report's sample answers
