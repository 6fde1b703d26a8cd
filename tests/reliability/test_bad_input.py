"""Bad input through the real CLI: one line naming the field or file and the fix, exit 2, nothing written.

Every row of :data:`CASES` is a user mistake run through ``kdforge.cli.main`` in-process,
in a fresh folder (the test's ``tmp_path``, also the working directory). Each must

- exit with code 2, print exactly one line on stderr, ``error: ...``, without a traceback,
  and that line must hold the row's fragment (the field or file, and the fix);
- leave the folder as it was: every path, modification time and byte.

Some mistakes only show once the models are loaded and a batch goes through the objective
(a mask, a layer, hidden sizes, a served teacher's first answer, a corrupt cache shard);
those rows are marked ``midrun``: loading messages may come before the error, which is
still the last line. `kdforge run` finds them in its memory plan's probe batch, before
anything is written. A few are found only once the run folder exists (the accelerator's
checks); those rows are marked ``writes``: new files may appear, but nothing that
existed before may change.

NaN or inf teacher outputs, a full disk, crafted pickles, path escapes and secrets have
their own tests in tests/reliability; the table leaves them out.
"""

from __future__ import annotations

import shutil
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from kdforge.cli import main

# ----- the cases' building blocks ----------------------------------------------------------


@dataclass
class Ctx:
    """What a case's setup sees: its folder and the values its arguments name as ``$name``."""

    tmp: Path
    values: dict[str, str]

    def write(self, name: str, text: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(string.Template(text).substitute(self.values))
        return path


Setup = Callable[[Ctx], None]


@dataclass(frozen=True)
class Case:
    id: str
    #: the command line; ``$tmp``, ``$teacher`` (a trained digits MLP), ``$lm`` (a tiny Llama) are filled in
    args: tuple[str, ...]
    #: what the error line must hold: the field or file, and the fix
    fragment: str
    setup: tuple[Setup, ...] = ()
    #: found once models are loaded and a batch runs: loading messages may precede the error line
    midrun: bool = False
    #: found after the run folder was created: new files may appear, none that existed may change
    writes: bool = False
    env: tuple[tuple[str, str], ...] = ()


def sets(*assignments: str) -> tuple[str, ...]:
    return tuple(arg for a in assignments for arg in ("--set", a))


def write(name: str, text: str | bytes) -> Setup:
    return lambda ctx: ctx.write(name, text)


#: a digits_kd run of a few steps against the trained digits teacher
KD_RUN = (
    "run",
    "digits_kd",
    *sets(
        "teacher.model=$teacher",
        "training.epochs=null",
        "training.steps=4",
        "training.checkpoint_every=null",
        "evaluation.throughput_batches=1",
        "evaluation.throughput_repeats=1",
        "evaluation.baseline=false",
    ),
)

#: a causal-LM recipe of a few steps: the tiny Llama teacher, a 2-layer student cut from it, Hamlet as data
LM_RECIPE = """\
name: tiny-lm
task: causal_lm
teacher: {model: $lm}
student: {from_teacher: {layers: [0, 3]}}
data: {format: text, path: hamlet.txt, max_length: 16}
objective:
  - {loss: forward_kl, weight: 1.0}
  - {loss: cross_entropy, weight: 0.1}
training: {lr: 0.003, batch_size: 8, steps: 4, log_every: 2}
evaluation: {batch_size: 8, throughput_batches: 1, throughput_repeats: 1, baseline: false}
"""


def lm_files(ctx: Ctx) -> None:
    from tiny_lm import TEXT

    ctx.write("lm.yaml", LM_RECIPE)
    ctx.write("hamlet.txt", TEXT * 4)


LM_RUN = ("run", "lm.yaml")


def other_vocab_lm(ctx: Ctx) -> None:
    """A tiny Llama whose tokenizer was trained on other text: another vocabulary."""
    from tiny_lm import TEXT, make_tokenizer, save_llama

    save_llama(ctx.tmp / "other-lm", make_tokenizer(TEXT.upper(), vocab_size=280), layers=2)


def npz(name: str, **arrays: np.ndarray) -> Setup:
    def make(ctx: Ctx) -> None:
        np.savez(ctx.tmp / name, **arrays)

    return make


def digits_cache(ctx: Ctx) -> None:
    """`kdforge cache` for the digits teacher into $tmp/cache (top-4 of 10 classes, in shards of 100)."""
    code = _main("cache", "digits_kd", *CACHE_SETS, "--shard-examples", "100", values=ctx.values)
    assert code == 0, "the cache the cache cases read could not be written"


CACHE_SETS = sets(
    "teacher.model=$teacher",
    "teacher.signal=cache",
    "teacher.path=$tmp/cache",
    "teacher.temperature=8.0",
    "teacher.k=4",
    "output.dir=$tmp/cache-runs",
)


def teacher_b(ctx: Ctx) -> None:
    """Another teacher: a copy of the digits teacher with one weight changed."""
    from safetensors.torch import load_file, save_file

    folder = ctx.tmp / "teacher-b"
    shutil.copytree(ctx.values["teacher"], folder)
    weights = load_file(folder / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name] + 0.5
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def nan_teacher(ctx: Ctx) -> None:
    """A copy of the digits teacher with NaN biases: every logit it gives is NaN."""
    from safetensors.torch import load_file, save_file

    folder = ctx.tmp / "nan-teacher"
    shutil.copytree(ctx.values["teacher"], folder)
    weights = load_file(folder / "model.safetensors")
    for value in weights.values():
        if value.dim() == 1:
            value[0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def corrupt_shards(ctx: Ctx) -> None:
    """Flip bytes in the middle of every shard (whichever the first batch reads): same size, another checksum."""
    for shard in (ctx.tmp / "cache").glob("shard-*.safetensors"):
        data = bytearray(shard.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
        shard.write_bytes(bytes(data))


def other_run(ctx: Ctx) -> None:
    ctx.write("runs/digits-kd/recipe.yaml", "name: digits-kd\n# another run's recipe\n")
    ctx.write("runs/digits-kd/report.json", "{}")


def sst2_without_labels(ctx: Ctx) -> None:
    """An SST-2 folder whose lines lack the label column (sentences only)."""
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        ctx.write(f"sst2/{name}", "sentence\na gripping film\na dull film\n")


SERVED = "teacher={signal: served, url: 'http://127.0.0.1:9', retries: 0, timeout: 1}"

# ----- the table ---------------------------------------------------------------------------

CASES = [
    # -- the recipe file
    Case("recipe-missing", ("validate", "nosuch.yaml"), "nosuch.yaml: no such recipe file; give a path to a YAML"),
    # rich must print the message as text: `[/]` is a closing markup tag, `[i]` an italic one
    Case("recipe-path-with-brackets", ("validate", "runs[/]x.yaml"), "runs[/]x.yaml: no such recipe file"),
    Case("recipe-is-a-folder", ("validate", "folder"), "folder: is a folder, not a recipe file",
         setup=(lambda ctx: (ctx.tmp / "folder").mkdir(),)),
    Case("recipe-invalid-yaml", ("validate", "bad.yaml"), "bad.yaml: not valid YAML at line 2, column 7; fix the",
         setup=(write("bad.yaml", "name: x\n  task: [unclosed\n"),)),
    Case("recipe-not-a-mapping", ("validate", "list.yaml"), "list.yaml: a recipe is a YAML mapping with task, student",
         setup=(write("list.yaml", "- task\n- student\n"),)),
    Case("recipe-nested-too-deeply", ("validate", "deep.yaml"), "deep.yaml: nested too deeply to be a recipe; fix the",
         setup=(write("deep.yaml", "student: " + "[" * 2000 + "]" * 2000),)),
    Case("recipe-not-utf8", ("validate", "binary.yaml"), "binary.yaml: cannot read the recipe",
         setup=(write("binary.yaml", b"\xff\xfe\x00name: x\x80\x81"),)),
    # the safe loader refuses python tags: the command never runs (it would create $tmp/pwned,
    # which the unchanged-folder check would see)
    Case("recipe-python-tag", ("validate", "evil.yaml"), "evil.yaml: not valid YAML at line 1",
         setup=(write("evil.yaml", '!!python/object/apply:os.system ["touch $tmp/pwned"]\n'),)),
    # -- names that are not registered
    Case("unknown-task", ("validate", "digits_kd", *sets("task=nosuch")),
         "task: unknown task 'nosuch'; known: causal_lm, classification"),
    Case("unknown-loss", ("validate", "digits_kd", *sets("objective[1].loss=hinton")),
         "objective[1].loss: unknown loss 'hinton'; known: attention_kl"),
    Case("unknown-field-typo", ("validate", "digits_kd", *sets("training.learning_rate=0.01")),
         "training.learning_rate: unknown field (check the spelling"),
    Case("unknown-student-field", ("validate", "digits_kd", *sets("student.hiden=[8]")),
         "student.hiden: unknown field (check the spelling"),
    Case("unknown-teacher-signal", ("validate", "digits_kd", *sets("teacher.signal=magic")),
         "teacher.signal: 'magic' is not a teacher signal; use one of 'online', 'cache', 'served', 'ensemble'"),
    Case("unknown-dataset", ("validate", "digits_kd", *sets("data.dataset=cifar")),
         "data.dataset: must be one of 'digits', 'mnist' or 'npz', got 'cifar'"),
    Case("unknown-precision", ("validate", "digits_kd", *sets("training.precision=fp8")),
         "training.precision: must be one of 'fp32', 'bf16' or 'fp16', got 'fp8'"),
    # -- wrong types
    Case("lr-a-string", ("validate", "digits_kd", *sets("training.lr=fast")),
         "training.lr: input should be a valid number, unable to parse string as a number, got 'fast'"),
    Case("batch-size-a-list", ("validate", "digits_kd", *sets("training.batch_size=[1,2]")),
         "training.batch_size: input should be a valid integer, got [1, 2]"),
    Case("trackers-a-string", ("validate", "digits_kd", *sets("training.trackers=mlflow")),
         "training.trackers: input should be a valid list, got 'mlflow'"),
    Case("training-a-number", ("validate", "digits_kd", *sets("training=5")),
         "training: input should be a valid dictionary or instance of TrainingConfig, got 5"),
    Case("name-with-spaces", ("validate", "digits_kd", *sets("name=my run")), "name: string should match pattern"),
    # -- ranges
    Case("lr-zero", ("validate", "digits_kd", *sets("training.lr=0")), "training.lr: must be > 0, got 0"),
    Case("lr-negative", ("validate", "digits_kd", *sets("training.lr=-0.001")), "training.lr: must be > 0, got -0.001"),
    Case("lr-infinite", ("validate", "digits_kd", *sets("training.lr=.inf")),
         "training.lr: input should be a finite number, got inf"),
    Case("batch-size-zero", ("validate", "digits_kd", *sets("training.batch_size=0")),
         "training.batch_size: must be >= 1, got 0"),
    Case("negative-weight", ("validate", "digits_kd", *sets("objective[1].weight=-0.9")),
         "objective[1].weight: must be >= 0, got -0.9"),
    Case("keep-checkpoints-zero", ("validate", "digits_kd", *sets("training.keep_checkpoints=0")),
         "training.keep_checkpoints: must be >= 1, got 0"),
    Case("test-fraction-above-1", ("validate", "digits_kd", *sets("data.test_fraction=1.5")),
         "data.test_fraction: must be < 1, got 1.5"),
    Case("objective-empty", ("validate", "digits_kd", *sets("objective=[]")),
         "objective: list should have at least 1 item"),
    # (--set training.steps alone drops the recipe's epochs: both given at once are refused)
    Case("steps-and-epochs", ("validate", "digits_kd", *sets("training={steps: 10, epochs: 2}")),
         "training: give exactly one of training.steps or training.epochs"),
    Case("neither-steps-nor-epochs", ("validate", "digits_kd", *sets("training.epochs=null")),
         "training: give exactly one of training.steps or training.epochs"),
    # -- --set
    Case("set-without-value", ("validate", "digits_kd", *sets("training.lr")),
         "--set training.lr: expected KEY=VALUE, e.g. training.lr=3e-4"),
    Case("set-unreadable-path", ("validate", "digits_kd", *sets("training..lr=1")),
         "--set training..lr: cannot read the path; use dots and [i], e.g. objective[1].weight"),
    Case("set-index-out-of-range", ("validate", "digits_kd", *sets("objective[5].weight=1")),
         "--set objective[5].weight: objective[5] does not exist"),
    Case("set-into-a-value", ("validate", "digits_kd", *sets("training.lr.max=1")),
         "--set training.lr.max: training.lr is not a section"),
    # -- objective terms
    Case("loss-param-unknown", ("validate", "digits_kd", *sets("objective[1].params.temp=2")),
         "objective[1].params.temp: 'hinton_kd' has no parameter 'temp'; known: temperature"),
    Case("loss-param-missing", ("validate", "digits_kd", *sets("objective[1]={loss: mi_alpha, field: hidden}")),
         "objective[1].params.student_dim: 'mi_alpha' needs student_dim; set it in the term's params"),
    Case("teacher-term-without-teacher", ("validate", "digits_kd", *sets("teacher=null")),
         "objective[1].loss: 'hinton_kd' compares with the teacher, but the recipe has no teacher; set teacher.model"),
    Case("field-the-task-lacks", ("validate", "digits_kd", *sets("objective[1].field=attentions")),
         "objective[1].field: task 'classification' has no output 'attentions'; it offers logits, hidden"),
    Case("temperature-differs-from-cache", ("validate", "digits_kd", *sets("teacher.signal=cache", "teacher.path=c")),
         "objective[1].params.temperature: 8, but teacher holds log-probs at temperature 1; set them equal"),
    Case("ensemble-weights-count", ("validate", "digits_kd",
                                    *sets("teacher={signal: ensemble, weights: [1, 2], members: [{model: a}]}")),
         "teacher.weights: 2 weights for 1 members"),
    Case("output-name-escapes", ("validate", "digits_kd", *sets("output.name=../escape")),
         "output.name: '../escape' would write outside output.dir"),
    Case("hidden-sizes-need-a-projection", (*KD_RUN, *sets("objective[1]={loss: hidden_mse, field: hidden}")),
         "objective[1] (hidden_mse): hidden sizes differ (16 for the student, 64 for the teacher) and no projection"
         " was given; add one (in code: projection=nn.Linear(16, 64)), or in a recipe give the student the teacher's"
         " hidden size or use mi_alpha", midrun=True),
    Case("mask-the-task-lacks", (*KD_RUN, *sets("objective[1].mask=rationale_mask")),
         "objective[1].mask: the batch has no 'rationale_mask'; this task's batches offer no named masks",
         midrun=True),
    Case("mask-not-a-mask", (*KD_RUN, *sets("objective[1].mask=labels")),
         "objective[1].mask: 'labels' is not a mask; this task's batches offer none", midrun=True),
    Case("mask-of-the-wrong-shape", (*LM_RUN, *sets("objective[0].mask=attention_mask")),
         "objective[0].mask: 'attention_mask' does not line up with the term's 'logits' (mask shape (2, 16) does not"
         " match positions (2, 15)); leave mask unset for the task's default, or choose another of", setup=(lm_files,),
         midrun=True),
    Case("layer-of-a-single-tensor", (*KD_RUN, *sets("objective[1].layer=0")),
         "objective[1].layer: the student's 'logits' is one tensor, not one per layer; remove the layer setting",
         midrun=True),
    # -- models
    Case("teacher-folder-missing", (*KD_RUN, *sets("teacher.model=nowhere/model")),
         "teacher.model: folder nowhere/model does not exist; check the path"),
    Case("teacher-package-not-installed", (*KD_RUN, *sets("teacher.model=package:no_such_model_pkg")),
         "teacher.model: package 'no_such_model_pkg' is not installed; install it"),
    Case("teacher-hub-id-offline", (*LM_RUN, *sets("teacher.model=someone/no-such-model")),
         "teacher.model: 'someone/no-such-model' is not a local folder and could not be fetched from the Hugging"
         " Face Hub (offline", setup=(lm_files,)),
    Case("vocabularies-differ", (*LM_RUN, *sets("student={model: other-lm}")),
         "student.model: its tokenizer (280 tokens) differs from the one of teacher.model (300 tokens); token-level"
         " distillation needs the same tokenizer on both sides: choose models that share it, or use a"
         " cross-tokenizer method", setup=(lm_files, other_vocab_lm)),
    Case("served-teacher-bad-url", (*LM_RUN, *sets("teacher={signal: served, url: 'ftp://x'}", "student={model: $lm}")),
         "teacher.url: 'ftp://x' is not an http(s) URL", setup=(lm_files,)),
    Case("served-teacher-unreachable", (*LM_RUN, *sets(SERVED, "student={model: $lm}")),
         "teacher.url: cannot reach http://127.0.0.1:9 after 1 tries", setup=(lm_files,), midrun=True),
    # -- data
    Case("npz-missing-label-array", (*KD_RUN, *sets("data.dataset=npz", "data.path=nolabel.npz")),
         "data.path: nolabel.npz is not an .npz file with arrays X and y",
         setup=(npz("nolabel.npz", X=np.zeros((20, 4))),)),
    Case("npz-empty-file", (*KD_RUN, *sets("data.dataset=npz", "data.path=empty.npz")),
         "data.path: empty.npz is not an .npz file with arrays X and y", setup=(write("empty.npz", b""),)),
    Case("npz-garbage", (*KD_RUN, *sets("data.dataset=npz", "data.path=garbage.npz")),
         "data.path: garbage.npz is not an .npz file with arrays X and y",
         setup=(write("garbage.npz", bytes(range(256))),)),
    Case("npz-missing", (*KD_RUN, *sets("data.dataset=npz", "data.path=nowhere.npz")),
         "data.path: nowhere.npz does not exist"),
    Case("text-empty", (*LM_RUN, *sets("data.path=empty.txt")), "data.path: empty.txt is empty",
         setup=(lm_files, write("empty.txt", ""))),
    Case("text-not-utf8", (*LM_RUN, *sets("data.path=garbage.txt")), "data.path: garbage.txt is not UTF-8 text",
         setup=(lm_files, write("garbage.txt", bytes(range(128, 256)) * 4))),
    Case("text-missing", (*LM_RUN, *sets("data.path=nowhere.txt")),
         "data.path: nowhere.txt does not exist (looked in the current folder and in KDFORGE_DATA_DIR",
         setup=(lm_files,)),
    Case("jsonl-missing-response-field", (*LM_RUN, *sets("data.format=jsonl", "data.path=pairs.jsonl")),
         "data.response_field: pairs.jsonl line 1 has no 'response' field (it has 'prompt', 'answer'); set"
         " data.response_field", setup=(lm_files, write("pairs.jsonl", '{"prompt": "a", "answer": "b"}\n' * 20))),
    Case("jsonl-not-json", (*LM_RUN, *sets("data.format=jsonl", "data.path=pairs.jsonl")),
         "data.path: pairs.jsonl line 2 is not valid JSON",
         setup=(lm_files, write("pairs.jsonl", '{"prompt": "a", "response": "b"}\nnot json\n'))),
    Case("sst2-missing-label-column", ("run", "text_teacher_sst2", *sets("data.path=sst2")),
         "train.tsv could not be read as csv (Too many columns specified: expected 2 and found 1)",
         setup=(sst2_without_labels,)),
    Case("mnist-data-dir-missing", ("run", "mnist_teacher"), "data.dataset: MNIST needs",
         env=(("KDFORGE_DATA_DIR", "$tmp/nodata"),)),
    # -- teacher caches
    Case("cache-for-another-teacher", (*KD_RUN, *CACHE_SETS, *sets("teacher.model=$tmp/teacher-b")),
         "cache: made for another run: teacher (cache", setup=(digits_cache, teacher_b)),
    Case("cache-corrupt-shard", (*KD_RUN, *CACHE_SETS),
         "checksum mismatch (corrupt shard); run `kdforge cache` again", setup=(digits_cache, corrupt_shards),
         midrun=True),
    Case("cache-missing", (*KD_RUN, *CACHE_SETS), "cache: no manifest.json; write the cache with `kdforge cache"),
    Case("cache-output-not-a-cache", ("cache", "digits_kd", *CACHE_SETS),
         "cache: exists and is not a kdforge cache; choose another --output",
         setup=(write("cache/notes.txt", "mine"),)),
    Case("cache-bad-dtype", ("cache", "digits_kd", "--dtype", "fp7"), "--dtype fp7: use float32, float16, bfloat16"),
    Case("cache-without-teacher", ("cache", "digits_teacher"), "teacher: the recipe has no teacher, so there is"),
    # -- the run folder and the command line
    Case("output-holds-another-run", KD_RUN,
         "runs/digits-kd already holds a run; continue it with --resume, choose another output.name, or --set"
         " output.overwrite=true", setup=(other_run,)),
    Case("output-is-a-file", KD_RUN, "runs/digits-kd: is a file, not a run folder",
         setup=(write("runs/digits-kd", "not a folder"),)),
    Case("resume-nothing", (*KD_RUN, "--resume"), "runs/digits-kd: nothing to resume (no recipe.yaml there); run"),
    Case("resume-another-recipe", (*KD_RUN, "--resume"),
         "runs/digits-kd/recipe.yaml differs from this recipe; resume with the same recipe", setup=(other_run,)),
    Case("seeds-not-integers", (*KD_RUN, "--seeds", "a,b"), "--seeds a,b: give integers separated by commas"),
    Case("seeds-repeated", (*KD_RUN, "--seeds", "1,1"), "--seeds 1,1: give distinct integers"),
    Case("demo-unknown", ("demo", "nosuch"), "kdforge demo nosuch: no such demo; choose lm or digits"),
    Case("rank-bad-init", ("students", "rank", "diswot_digits", "--init", "xavier"), "--init xavier: use gaussian"),
    Case("report-not-a-run", ("report", "nowhere"), "nowhere: no report.json"),
    # -- the machine
    Case("device-cuda-without-gpu", (*KD_RUN, *sets("training.device=cuda")),
         "training.device: cuda was asked for but no GPU is visible; use auto or cpu"),
    Case("fp16-on-cpu", (*KD_RUN, *sets("training.precision=fp16", "training.device=cpu")),
         "training.precision: fp16 needs a GPU; use bf16 or fp32 on the CPU"),
    Case("tracker-not-installed", (*KD_RUN, *sets("training.trackers=[mlflow]")),
         "training.trackers: mlflow is not installed; pip install mlflow"),
    # -- safety and broken teachers (more in test_safety.py, test_nan_guard.py, test_disk_full.py)
    Case("output-name-absolute", ("validate", "digits_kd", *sets("output.name=/tmp/elsewhere")),
         "output.name: '/tmp/elsewhere' would write outside output.dir"),
    Case("plugin-not-importable", ("validate", "digits_kd", *sets("plugins=[kd_no_such_plugin]")),
         "plugins[0]: cannot import kd_no_such_plugin (No module named 'kd_no_such_plugin'); install it"),
    Case("served-teacher-key-in-url", ("validate", "digits_kd", *sets("teacher={signal: served, url: 'http://u:pw@h'}")),
         "teacher.url: holds a password; remove it from the URL, put the key in an environment variable"),
    # a teacher whose every logit is NaN: found at the first step, after the run folder was made
    Case("teacher-outputs-nan", (*KD_RUN, *sets("teacher.model=nan-teacher")),
         "NaN or inf at step 0 of student (from: teacher.logits); no checkpoint yet", setup=(nan_teacher,),
         midrun=True, writes=True),
]  # fmt: skip

# ----- running them --------------------------------------------------------------------------

#: fixtures a case's ``$name`` stands for, built only for the cases that use them
FIXTURES = {"teacher": "digits_teacher", "lm": "tiny_lm_teacher"}


def _fill(arg: str, values: dict[str, str]) -> str:
    return string.Template(arg).substitute(values)


def _main(*args: str, values: dict[str, str]) -> int | str | None:
    try:
        main([_fill(a, values) for a in args])
    except SystemExit as exc:
        return exc.code
    return 0


def snapshot(root: Path) -> dict[str, tuple[int, bytes] | None]:
    """Every path under ``root``: files with their mtime and bytes; folders as None."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes()) if p.is_file() else None
        for p in sorted(root.rglob("*"))
    }


def _values(case: Case, tmp_path: Path, request) -> dict[str, str]:
    """``$tmp``, and the fixtures the case names (the LM recipe names ``$lm``), built only when used."""
    values = {"tmp": str(tmp_path)}
    text = " ".join(case.args) + (LM_RECIPE if lm_files in case.setup else "")
    for name, fixture in FIXTURES.items():
        if f"${name}" in text:
            values[name] = str(request.getfixturevalue(fixture))
    return values


def test_the_table_has_the_required_cases_with_unique_ids():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 45


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_changes_nothing(case, tmp_path, monkeypatch, capsys, request):
    monkeypatch.chdir(tmp_path)  # relative paths (runs/, data files) land in the test's folder
    values = _values(case, tmp_path, request)
    for name, value in case.env:
        monkeypatch.setenv(name, _fill(value, values))
    ctx = Ctx(tmp_path, values)
    for step in case.setup:
        step(ctx)
    before = snapshot(tmp_path)
    capsys.readouterr()  # what setup printed is not the command's

    code = _main(*case.args, values=values)
    err = capsys.readouterr().err

    assert code == 2, f"exit {code}; stderr: {err}"
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if not case.midrun:
        assert len(lines) == 1, f"more than one line on stderr: {err}"
    assert lines and lines[-1].startswith("error: "), err
    assert [line for line in lines if line.startswith("error:")] == [lines[-1]]
    assert case.fragment in lines[-1]

    after = snapshot(tmp_path)
    if case.writes:  # the run folder may exist now; nothing that was there before changed
        assert {path: after.get(path) for path in before} == before
    else:
        assert after == before, f"written or changed: {sorted(set(after) ^ set(before))}"


def test_the_python_tag_command_never_ran(tmp_path, monkeypatch, capsys):
    """The unsafe YAML tag would create a file; the safe loader refuses the recipe before anything runs."""
    monkeypatch.chdir(tmp_path)
    sentinel = tmp_path / "pwned"
    (tmp_path / "evil.yaml").write_text(f'!!python/object/apply:os.system ["touch {sentinel}"]\n')
    assert _main("run", "evil.yaml", values={}) == 2
    assert not sentinel.exists()
    assert "not valid YAML" in capsys.readouterr().err
