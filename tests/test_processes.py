"""Several processes: `accelerate launch` on the CPU (gloo, 2 processes) gives the run of one process.

``training.batch_size`` is the global batch, so the same recipe and seed must give the
same losses, metrics and weights on 1 and 2 processes (within 1e-5: float sums in
another order), and a checkpoint written by one process continues under two.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import SHARED_DATA, TINY, launch, run_launched
from kdforge.engine.checkpoint import list_checkpoints

TOLERANCE = 1e-5
NO_BASELINE = "evaluation.baseline=false"


def launch_command(processes: int) -> list[str]:
    """``kdforge`` on ``processes`` processes, as the README launches it."""
    return [*launch(processes), "-m", "kdforge"]


def kdforge(processes: int, *args: str, env: dict[str, str] | None = None, check: bool = True):
    env = {**os.environ, "KDFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1", **(env or {})}
    done = run_launched([*launch_command(processes), *args], env=env, timeout=600)
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
    for folder in ("model", "baseline") if (one / "baseline").exists() else ("model",):
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


def test_active_distillation_chooses_buys_and_trains_on_two_processes_as_on_one(tmp_path, digits_teacher):
    """Each round's choice (by the student's margins), the teacher's bought logits and the training
    on them: the same on every process, so the run equals one process's."""
    rad = [
        "data.train_limit=null",
        "methods=[{name: active_distillation, strategy: margin, budget: 40, rounds: 2}]",
        NO_BASELINE,
    ]
    for processes, name in ((1, "one"), (2, "two")):
        kdforge(processes, *_digits_kd(digits_teacher, tmp_path, name, *rad, "training.steps=3"))
    assert_same_run(tmp_path / "one", tmp_path / "two")
    rounds = [
        json.loads((tmp_path / name / "report.json").read_text())["runs"][0]["models"]["student"]["train"]["selection"]
        for name in ("one", "two")
    ]
    assert rounds[0]["teacher_queries"] == rounds[1]["teacher_queries"] == 40
    for a, b in zip(rounds[0]["rounds"], rounds[1]["rounds"], strict=True):  # the same points, bought and scored
        assert a.keys() == b.keys() and all(close(a[k], b[k]) for k in a), (a, b)


def test_a_run_with_a_tracker_keeps_its_processes_together_through_the_baseline(tmp_path, digits_teacher):
    """A tracker is finished at the end of the student's phase without leaving the process group
    (Accelerate's end_training would), so the baseline phase and the evaluation still run as one group."""
    pytest.importorskip("tensorboard", reason="tensorboard is in the test extras")
    tracked = ["training.trackers=[tensorboard]", "training.steps=6"]
    for processes, name in ((1, "one"), (2, "two")):
        kdforge(processes, *_digits_kd(digits_teacher, tmp_path, name, *tracked))
    assert_same_run(tmp_path / "one", tmp_path / "two")
    assert list((tmp_path / "two").rglob("events.out.tfevents.*"))


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


# ---- every task: one training step's loss and gradient ---------------------------------------

#: One step of a recipe's objective on the first examples of its training set, the way the engine
#: runs it: each process takes its share of the batch, computes its loss under process_share, and
#: the gradients are averaged over processes (what DDP does). The main process writes the global
#: loss, terms and gradient. The student is in eval mode: dropout draws differ between processes,
#: and everything else must not.
_STEP_SCRIPT = """
import json, sys
import torch
from kdforge.distributed import (
    leave_processes, mean_over_processes, process_share, rank, share_bounds, start_processes, world_size,
)

start_processes(True)
import torch.distributed as dist
from accelerate.utils import set_seed
from kdforge.data.indexed import IndexedDataset, indexed_collate
from kdforge.objective import Objective, teacher_fields_of
from kdforge.checks import load_recipe
from kdforge.runner import training_loss
from kdforge.signals import build_signal
from kdforge.tasks import TASKS

name, batch_size, out, overrides = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:]
recipe = load_recipe(name, overrides)
task = TASKS.get(recipe.task)(recipe)
train = IndexedDataset(task.splits().train)
signal = build_signal(task, recipe.teacher, teacher_fields_of(recipe.objective)).signal if recipe.teacher else None
objective = Objective(recipe.objective, 10, names=recipe.term_names(), seed=0)
set_seed(0)
model = task.build_student().eval()
start, stop = share_bounds(batch_size, rank(), world_size())
batch = indexed_collate(task.collate)([train[i] for i in range(start, stop)])
with process_share(world_size()):
    loss, terms, _ = training_loss(task, objective, signal)(model, batch, 3)
loss.backward()
grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters() if p.requires_grad]
flat = torch.cat([g.reshape(-1) for g in grads]).double()
if world_size() > 1:
    dist.all_reduce(flat)
    flat /= world_size()
values = mean_over_processes(torch.stack([loss.detach(), *terms.values()])).tolist()
if rank() == 0:
    torch.save({"loss": values[0], "terms": dict(zip(terms, values[1:])), "grad": flat}, out)
leave_processes(together=True)  # as the CLI ends a launched command
"""


def one_step(tmp_path: Path, processes: int, recipe: str, batch_size: int, *overrides: str) -> dict:
    script = tmp_path / "step.py"
    script.write_text(_STEP_SCRIPT)
    out = tmp_path / f"step-{processes}.pt"
    launcher = launch(processes)
    env = {**os.environ, "KDFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    done = run_launched([*launcher, str(script), recipe, str(batch_size), str(out), *overrides], env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return torch.load(out, weights_only=True)


def assert_same_step(tmp_path: Path, recipe: str, batch_size: int, *overrides: str) -> dict:
    one, two = (one_step(tmp_path, n, recipe, batch_size, *overrides) for n in (1, 2))
    assert close(one["loss"], two["loss"]), (one["loss"], two["loss"])
    for term, value in one["terms"].items():
        assert close(value, two["terms"][term]), (term, value, two["terms"][term])
    scale = one["grad"].abs().max().item()
    assert scale > 0, "no gradient reached the student"
    assert torch.allclose(one["grad"], two["grad"], rtol=1e-4, atol=TOLERANCE * scale), (
        (one["grad"] - two["grad"]).abs().max().item(),
        scale,
    )
    return one


def _needs(*parts: str) -> None:
    """Skip unless the shared data holds ``parts`` (and point kdforge at it)."""
    if not SHARED_DATA.joinpath(*parts).exists():
        pytest.skip(f"{'/'.join(parts)} is not in {SHARED_DATA} (set KDFORGE_DATA_DIR)")
    os.environ["KDFORGE_DATA_DIR"] = str(SHARED_DATA.resolve())


#: the second term swapped for losses that couple the batch's rows: gathered from every process
COUPLED = {
    "sinkhorn": ("objective[1].loss=sinkhorn", "objective[1].params={temperature: 2.0}"),
    "mi_alpha": (
        "objective[1].loss=mi_alpha",
        "objective[1].field=hidden",
        "objective[1].params={student_dim: 16, teacher_dim: 64, alpha: 0.5}",
    ),
}


@pytest.mark.parametrize("term", sorted(COUPLED))
def test_a_loss_that_couples_the_batch_is_exact_on_two_processes(tmp_path, digits_teacher, term):
    assert_same_step(tmp_path, "digits_kd", 5, f"teacher.model={digits_teacher}", *COUPLED[term])


def test_a_causal_lm_step_is_exact_on_two_processes(tmp_path, tiny_gguf_teacher, shakespeare_dir):
    teacher = [f"teacher.model={tiny_gguf_teacher}", "student.from_teacher={layers: [0, 3]}"]
    assert_same_step(tmp_path, "smollm2_kd", 5, *teacher, "data.max_length=32", "data.train_limit=16")


def test_a_text_classifier_step_is_exact_on_two_processes(tmp_path):
    """On a user's CSV: the table reader (which reads the bundled SST-2 too) gives every process the
    same examples in the same order (issue 21)."""
    rows = [("a fine film", "good"), ("dull and long", "bad"), ("a delight", "good"), ("a mess", "bad")] * 6
    csv = tmp_path / "reviews.csv"
    csv.write_text("review,stars\n" + "".join(f"{text},{label}\n" for text, label in rows))
    data = f"data={{files: {csv}, columns: {{text: review, label: stars}}, max_length: 16}}"
    assert_same_step(tmp_path, "text_teacher_sst2", 5, data)


#: SciFact at tiny size, as tests/test_recipes.py runs the encoder recipes
SCIFACT = ["data.max_length=32", "data.test.query_limit=6", "data.test.corpus_limit=40"]
ENCODER_STEPS = {
    # in-batch listwise scores against the global batch, MiniLM's token-level relations
    "embedding_minilm_l6_to_l3": ["data.train_limit=12", "data.test.wikiqa_limit=4"],
    # TAS-B in-batch negatives scored by the cross-encoder over the global batch's documents
    "ranking_tasb_scifact": [
        "data.query_limit=8", "data.corpus_limit=30", "data.negatives=4", "data.negatives_per_example=2",
    ],
    # in-batch BM25 and dense teachers, and FLOPS (a batch mean inside a square)
    "sparse_retriever_scifact": ["data.query_limit=8", "data.corpus_limit=30", "data.negatives=4"],
    # the union of the global batch's top-K documents
    "distill_vq_scifact": [
        "student.nlist=4", "student.nbits=4", "data.query_limit=16", "data.document_queries=8", "data.top_k=10",
    ],
}  # fmt: skip


@pytest.mark.parametrize("recipe", sorted(ENCODER_STEPS))
def test_an_encoder_step_is_exact_on_two_processes(tmp_path, recipe):
    _needs("scifact", "corpus.jsonl")
    overrides = [*SCIFACT, *ENCODER_STEPS[recipe]]
    if recipe == "distill_vq_scifact":
        overrides = [o for o in overrides if not o.startswith("data.max_length")]
    assert_same_step(tmp_path, recipe, 5, *overrides)


def test_the_readme_runs_the_command_these_tests_run_and_its_configs_load():
    from accelerate.commands.config.config_args import load_config_from_file

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    args = launch_command(2)[1:]
    port = args.index("--main_process_port")
    tested = " ".join(["accelerate", *args[:port], *args[port + 2 :], "run", "recipe.yaml"])
    assert tested in readme
    configs = sorted(set(re.findall(r"examples/accelerate/[\w.]+\.yaml", readme)))
    assert configs, "the README names no Accelerate config"
    for name in configs:
        config = load_config_from_file(str(Path(__file__).resolve().parents[1] / name))
        assert config.distributed_type.value == "MULTI_GPU", name  # DDP: what kdforge supports on GPUs
        assert config.num_processes % config.num_machines == 0, name


def test_a_loss_that_couples_the_batch_trains_under_ddp_as_on_one_process(tmp_path, digits_teacher):
    """Its inputs are gathered with their gradient while DDP reduces the model's: same run as alone."""
    sinkhorn = COUPLED["sinkhorn"]
    kdforge(1, *_digits_kd(digits_teacher, tmp_path, "one", *sinkhorn))
    kdforge(2, *_digits_kd(digits_teacher, tmp_path, "two", *sinkhorn))
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_the_sparse_retriever_trains_end_to_end_on_two_processes(tmp_path):
    """In-batch negatives scored by BM25 and a dense teacher over the global batch, FLOPS gathered, DDP:
    the whole run on two processes (dropout differs from one process, so the step tests check exactness)."""
    _needs("scifact", "corpus.jsonl")
    settings = [
        *TINY, "training.steps=4", "training.batch_size=5", *SCIFACT, "data.test.latency_queries=2",
        *ENCODER_STEPS["sparse_retriever_scifact"], f"output.dir={tmp_path}", "output.name=run",
    ]  # fmt: skip
    kdforge(2, "run", "sparse_retriever_scifact", *(arg for s in settings for arg in ("--set", s)))
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    student = report["runs"][0]["models"]["student"]
    assert student["train"]["steps"] == 4 and math.isfinite(student["train"]["final_loss"])
    assert {"listwise_kl", "flops"} <= set(student["train"]["final_terms"])
    assert (tmp_path / "run" / "model" / "README.md").is_file()
    # the miner's embeddings were encoded and written by the main process alone: no torn or stray files
    cache = tmp_path / "kdforge-cache" / "embeddings"
    assert len(list(cache.glob("*.npy"))) == 2 and not list(cache.glob(".*"))


_SHARED_FILE_SCRIPT = """
import json, sys, time
from pathlib import Path
from kdforge.distributed import leave_processes, main_first, on_main, rank, start_processes
from kdforge.errors import KDForgeError, RecipeError

start_processes(True)
folder = Path(sys.argv[1])

def fill():
    target = folder / "shared.txt"
    if target.exists():
        return "read " + target.read_text()
    with (folder / "writers.txt").open("a") as fh:
        fh.write(f"{rank()}\\n")
    time.sleep(1.0)  # a second writer would arrive while this one writes
    target.write_text("value")
    return "wrote value"

def refuse():
    raise RecipeError("data.miner: no such model")

got = main_first(fill)
# the others wait inside on_main; the main process's nested calls must not wait for them
nested = on_main(lambda: main_first(lambda: on_main(lambda: 7)))
try:
    main_first(refuse)
    error = None
except KDForgeError as exc:
    error = str(exc)
# one file per process: two prints on the launcher's shared stdout can interleave on one line
result = {"rank": rank(), "got": got, "nested": nested, "error": error}
(folder / f"result-{rank()}.json").write_text(json.dumps(result))
leave_processes(together=True)  # as the CLI ends a launched command
"""


def test_a_shared_file_is_written_by_the_main_process_and_read_by_the_others(tmp_path):
    """main_first: the main process fills a shared cache while the others wait, then they read it;
    inside on_main the main process acts alone (nested calls do not wait); a user error reaches all."""
    script = tmp_path / "shared.py"
    script.write_text(_SHARED_FILE_SCRIPT)
    env = {**os.environ, "KDFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    done = run_launched([*launch(2), str(script), str(tmp_path)], env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [json.loads((tmp_path / f"result-{r}.json").read_text()) for r in (0, 1)]
    assert [r["got"] for r in lines] == ["wrote value", "read value"]
    assert (tmp_path / "writers.txt").read_text() == "0\n"
    assert [r["nested"] for r in lines] == [7, 7]
    assert [r["error"] for r in lines] == ["data.miner: no such model"] * 2


@pytest.mark.parametrize(("flag", "name"), [("FSDP", "FSDP"), ("DEEPSPEED", "DeepSpeed")])
def test_a_launch_that_would_shard_the_student_on_gpus_is_refused_in_one_line(monkeypatch, flag, name):
    from kdforge.engine.trainer import check_training_settings
    from kdforge.errors import KDForgeError
    from kdforge.recipe import TrainingConfig

    monkeypatch.setenv(f"ACCELERATE_USE_{flag}", "true")
    cfg = TrainingConfig(steps=1)
    assert check_training_settings(cfg.model_copy(update={"device": "cpu"}))[0]  # on the CPU: plain data parallel
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    with pytest.raises(KDForgeError) as info:
        check_training_settings(cfg)
    assert str(info.value).startswith(f"accelerate launch: {name} shards the student")
    assert "launch with --multi_gpu" in str(info.value)


def test_sigterm_to_the_launcher_stops_both_processes_at_one_checkpoint_and_resume_continues(tmp_path, digits_teacher):
    """The launcher passes SIGTERM on to each process; they agree on the step, the main one saves it,
    both exit, and --resume on two processes ends where a run never stopped ends."""
    import signal
    import time

    # long enough that the signal lands in training (its first logged step comes after a few seconds of
    # start-up, the rest of the run takes several more); checkpoints only where the signal asks
    longer = ["training.steps=400", "training.checkpoint_every=1000", "training.eval_every=null", NO_BASELINE]
    kdforge(2, *_digits_kd(digits_teacher, tmp_path, "whole", *longer))
    args = _digits_kd(digits_teacher, tmp_path, "stopped", *longer)
    env = {**os.environ, "KDFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*launch_command(2), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().strip()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be stopped"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "stopped by SIGTERM at step" in err.decode(), err.decode()[-3000:]
    saved = list_checkpoints(tmp_path / "stopped" / "checkpoints" / "student")
    assert saved and 0 < int(saved[-1].name.split("-")[1]) < 400
    kdforge(2, *args, "--resume")
    assert_same_run(tmp_path / "whole", tmp_path / "stopped")


@pytest.fixture
def served_tiny_lm(tiny_lm_teacher):
    """kdforge's completions server for the tiny LM, in a thread of this process."""
    import threading

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kdforge.signals.server import CompletionEngine, make_server

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_teacher).eval()
    server = make_server(CompletionEngine(model, AutoTokenizer.from_pretrained(tiny_lm_teacher), "tiny"), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_a_served_teacher_feeds_two_processes_as_it_feeds_one(tmp_path, tiny_lm_teacher, served_tiny_lm):
    """The teacher sits in its own process (its own GPU, on a GPU machine); the students of both processes
    ask it for their shares' top-k, and the run equals one process's."""
    import yaml

    text = tmp_path / "corpus.txt"
    text.write_text("To be, or not to be, that is the question. Whether tis nobler in the mind to suffer. " * 40)
    recipe = {
        "name": "served-lm",
        "task": "causal_lm",
        "teacher": {"signal": "served", "url": served_tiny_lm, "k": 8},
        "student": {"model": str(tiny_lm_teacher)},
        "data": {"format": "text", "path": str(text), "max_length": 16},
        "objective": [{"loss": "forward_kl"}, {"loss": "cross_entropy", "weight": 0.1}],
        "training": {"lr": 3e-3, "batch_size": 7, "steps": 6, "log_every": 2},
        "evaluation": {"batch_size": 8, "throughput_batches": 1, "throughput_repeats": 1},
        # float32 on disk: saving in bfloat16 rounds the 1e-7 differences of a two-process run to whole ulps
        "output": {"dir": str(tmp_path), "dtype": "float32"},
    }
    path = tmp_path / "served.yaml"
    path.write_text(yaml.safe_dump(recipe))
    kdforge(1, "run", str(path), "--set", "output.name=one")
    kdforge(2, "run", str(path), "--set", "output.name=two")
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_a_teacher_writing_fresh_answers_each_epoch_feeds_two_processes_as_it_feeds_one(tmp_path, tiny_lm_teacher):
    """online_generation: the main process has the teacher write each epoch's answers (into the store)
    and every process trains on them, so the run equals one process's; the store holds one file per epoch."""
    import yaml

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"prompt": f"To be or not {i}, that is the question"}) + "\n" for i in range(24))
    )
    recipe = {
        "name": "written-lm",
        "task": "causal_lm",
        "teacher": {"model": str(tiny_lm_teacher)},
        "student": {"from_teacher": {"layers": [0, 3]}},
        "data": {"format": "jsonl", "path": str(prompts), "max_length": 32},
        "generation": {"max_new_tokens": 6},
        "methods": [{"name": "online_generation"}],
        "objective": [{"loss": "forward_kl"}, {"loss": "cross_entropy", "weight": 0.1}],
        "training": {"lr": 3e-3, "batch_size": 7, "epochs": 3, "steps": None, "log_every": 1},
        "evaluation": {"batch_size": 8, "throughput_batches": 1, "throughput_repeats": 1, "baseline": False},
        # float32 on disk: saving in bfloat16 rounds the 1e-7 differences of a two-process run to whole ulps
        "output": {"dir": str(tmp_path), "dtype": "float32"},
    }  # fmt: skip
    path = tmp_path / "written.yaml"
    path.write_text(yaml.safe_dump(recipe))
    for processes, name in ((1, "one"), (2, "two")):
        store = tmp_path / f"cache-{name}"
        kdforge(processes, "run", str(path), "--set", f"output.name={name}", env={"KDFORGE_CACHE_DIR": str(store)})
        keys = sorted(json.loads(k.read_text())["purpose"] for k in (store / "generations").glob("*.key.json"))
        assert keys == ["epoch-1", "epoch-2", "responses"] and not list((store / "generations").glob("*.partial*"))
    assert_same_run(tmp_path / "one", tmp_path / "two")


class _ScriptedCompletions(BaseHTTPRequestHandler):
    """A completions endpoint whose n-th request gets the n-th scripted answer (then empty ones):
    asked once per prompt by each of two processes, it would give them different examples."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.prompts.append(body["prompt"])  # type: ignore[attr-defined]
        answers = self.server.answers  # type: ignore[attr-defined]
        data = json.dumps({"choices": [{"index": 0, "text": answers.pop(0) if answers else ""}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_pgkd_asks_its_teacher_once_per_prompt_and_both_processes_train_on_the_answers(tmp_path):
    """The main process asks a (sampling) served teacher; every process gets its answer, so the
    training sets, and the steps, stay the same on both."""
    _needs("sst2", "train.tsv")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ScriptedCompletions)
    server.prompts, server.answers = [], ["positive: a wonderful , moving picture\nnegative: a tedious , lifeless mess"]  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        settings = [
            "training.epochs=null", "training.steps=2", "training.batch_size=8", "training.eval_every=null",
            "training.checkpoint_every=null", "data.train_limit=16", "data.validation_limit=8",
            "data.test_limit=8", "data.max_length=24", f"generation.url={url}",
            "methods=[{name: pgkd, rounds: 2, patience: 2}]",
            f"output.dir={tmp_path}", "output.name=run",
        ]  # fmt: skip
        kdforge(2, "run", "text_teacher_sst2", *(arg for s in settings for arg in ("--set", s)))
    finally:
        server.shutdown()
    assert len(server.prompts) == 2  # type: ignore[attr-defined]  # one prompt per round, from one process
    pgkd = json.loads((tmp_path / "run" / "report.json").read_text())["runs"][0]["models"]["student"]["train"]["pgkd"]
    first, second = pgkd["rounds"][1], pgkd["rounds"][2]
    assert (first["accepted"], second["accepted"]) == (2, 0) and pgkd["training_set_size"] == 16 + 2
