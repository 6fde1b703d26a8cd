"""Safety: kdforge never executes what it loads, writes only inside its output root, and keeps secrets secret.

Every refusal is the CLI's one line and exit code 2, and a sentinel file proves that the
crafted payload did not run.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
from pathlib import Path

import pytest
import yaml

from conftest import crash_at_step, tiny
from kdforge.cli import main
from kdforge.engine.checkpoint import list_checkpoints
from kdforge.signals.server import CompletionEngine, make_server


class Exploit:
    """Unpickling this runs a shell command (creates the sentinel file)."""

    def __init__(self, sentinel: Path):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    captured = capsys.readouterr()
    return info.value.code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code == 2, err
    # transformers may draw its own "Loading weights" bar first; kdforge's message is the one last line
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:") and err.count("error:") == 1 and "Traceback" not in err, err
    err = last
    for fragment in fragments:
        assert fragment in err, err


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def lm_recipe(out: Path, teacher_model: Path | str, text: Path, **sections) -> dict:
    """A tiny causal-LM recipe on a text file (no shared data needed)."""
    return {
        "name": "tiny-lm",
        "task": "causal_lm",
        "teacher": {"model": str(teacher_model)},
        "student": {"from_teacher": {"layers": [0, 3]}},
        "data": {"format": "text", "path": str(text), "max_length": 16},
        "objective": [{"loss": "forward_kl"}, {"loss": "cross_entropy", "weight": 0.1}],
        "training": {"lr": 3e-3, "batch_size": 8, "steps": 4, "log_every": 2},
        "evaluation": {"batch_size": 8, "throughput_batches": 1, "throughput_repeats": 1},
        "output": {"dir": str(out)},
        **sections,
    }


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("To be, or not to be, that is the question. Whether tis nobler in the mind to suffer. " * 40)
    return path


# ----- pickles and remote code ---------------------------------------------------------------


@pytest.mark.parametrize("file", ["optimizer.pt", "scheduler.pt", "rng.pt"])
def test_a_crafted_pickle_in_a_checkpoint_is_refused_and_never_runs(
    tmp_path, digits_teacher, monkeypatch, capsys, file
):
    recipe = tiny("digits_kd", tmp_path / "runs", f"teacher.model={digits_teacher}")
    crash_at_step(recipe, 7, monkeypatch)
    ckpt = list_checkpoints(recipe.run_dir / "checkpoints" / "student")[-1]
    sentinel = tmp_path / "PWNED"
    (ckpt / file).write_bytes(pickle.dumps(Exploit(sentinel)))
    args = ["run", "digits_kd", "--resume", *[x for s in ("training.epochs=null", "training.steps=12",
            "training.checkpoint_every=5", "training.log_every=2", "evaluation.throughput_batches=1",
            "evaluation.throughput_repeats=1", f"output.dir={tmp_path / 'runs'}",
            f"teacher.model={digits_teacher}") for x in ("--set", s)]]  # fmt: skip
    code, _, err = cli(capsys, *args)
    assert_one_line_error(code, err, f"{file}: cannot be loaded safely", "delete this checkpoint")
    assert not sentinel.exists()


def test_pickled_model_weights_that_would_run_code_are_refused(tmp_path, tiny_lm_teacher, text, capsys):
    import shutil

    evil = tmp_path / "evil-lm"
    shutil.copytree(tiny_lm_teacher, evil)
    for weights in evil.glob("*.safetensors"):
        weights.unlink()
    sentinel = tmp_path / "PWNED"
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit(sentinel)))
    recipe = write_recipe(tmp_path / "r.yaml", lm_recipe(tmp_path / "runs", evil, text))
    code, _, err = cli(capsys, "run", str(recipe))
    assert_one_line_error(code, err, "teacher.model:", "pickled weights that would run code", ".safetensors")
    assert not sentinel.exists()
    assert not (tmp_path / "runs").exists(), "a refused run writes nothing"


def test_custom_model_code_runs_only_when_the_recipe_trusts_it(tmp_path, tiny_lm_teacher, text, capsys):
    import shutil

    sentinel = tmp_path / "PWNED"
    folder = tmp_path / "custom-lm"
    folder.mkdir()
    for file in tiny_lm_teacher.glob("*token*"):  # a tokenizer that loads, so the model is what is refused
        shutil.copy(file, folder)
    (folder / "config.json").write_text(
        '{"model_type": "kdforge_custom", "vocab_size": 64,'
        ' "auto_map": {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}}'
    )
    (folder / "custom.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    recipe = write_recipe(tmp_path / "r.yaml", lm_recipe(tmp_path / "runs", folder, text))
    code, _, err = cli(capsys, "run", str(recipe))
    assert_one_line_error(code, err, "teacher.model:", "needs its own Python code", "trust_remote_code: true")
    assert not sentinel.exists()


def test_yaml_tags_that_build_python_objects_are_refused(tmp_path, capsys):
    sentinel = tmp_path / "PWNED"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f'name: x\ntask: !!python/object/apply:os.system ["touch {sentinel}"]\n')
    code, _, err = cli(capsys, "validate", str(recipe))
    assert_one_line_error(code, err, "not valid YAML")
    assert not sentinel.exists()


# ----- what a recipe can make kdforge import ------------------------------------------------

PLUGIN = '''
import torch.nn.functional as F
from kdforge.losses.registry import register_loss


@register_loss("plugin_scaled_ce", target="labels")
def plugin_scaled_ce(student, labels, *, mask=None, scale: float = 1.0):
    """Cross-entropy times a scale (a plugin's loss)."""
    return scale * F.cross_entropy(student, labels)
'''


def test_components_come_from_registries_and_listed_plugins_only(tmp_path, monkeypatch, capsys):
    (tmp_path / "kd_test_plugin.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    sentinel = tmp_path / "PWNED"
    (tmp_path / "kd_sneaky.py").write_text(f"open({str(sentinel)!r}, 'w').close()\n")
    term = ["--set", "objective=[{loss: plugin_scaled_ce, params: {scale: 2.0}}]", "--set", "teacher=null"]

    # a loss named by a dotted path is looked up, never imported
    code, _, err = cli(capsys, "validate", "digits_kd", "--set", "objective=[{loss: kd_sneaky.anything}]")
    assert_one_line_error(code, err, "objective[0].loss", "kd_sneaky.anything")
    assert not sentinel.exists()
    # the plugin's loss is unknown until the recipe lists the plugin
    code, _, err = cli(capsys, "validate", "digits_kd", *term)
    assert_one_line_error(code, err, "objective[0].loss", "plugin_scaled_ce")
    with pytest.raises(SystemExit) as ok:
        main(["validate", "digits_kd", *term, "--set", "plugins=[kd_test_plugin]"])
    assert ok.value.code in (None, 0)
    assert "ok: digits-kd" in capsys.readouterr().out
    # a plugin that cannot be imported, or is not a module name
    code, _, err = cli(capsys, "validate", "digits_kd", "--set", "plugins=[kd_no_such_plugin]")
    assert_one_line_error(code, err, "plugins[0]: cannot import kd_no_such_plugin", "install it")
    code, _, err = cli(capsys, "validate", "digits_kd", "--set", "plugins=['os; rm -rf /']")
    assert_one_line_error(code, err, "plugins[0]", "is not a module name")
    (tmp_path / "kd_broken_plugin.py").write_text("1 / 0\n")
    code, _, err = cli(capsys, "validate", "digits_kd", "--set", "plugins=[kd_broken_plugin]")
    assert_one_line_error(
        code, err, "plugins[0]: importing kd_broken_plugin failed (ZeroDivisionError", "; fix the module"
    )


@pytest.fixture(autouse=True)
def _forget_the_test_plugin():
    """The plugin registers its loss in the process-wide registry: forget it, for the tests that list them."""
    yield
    from kdforge.losses import LOSSES

    LOSSES._items.pop("plugin_scaled_ce", None)
    sys.modules.pop("kd_test_plugin", None)
    sys.modules.pop("kd_broken_plugin", None)


# ----- output paths ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    ["output.name=../escaped", "output.name=../../etc", "output.name=a/../../b", "output.name=/tmp/abs",
     "output.name=..", "name=../escaped"],
)  # fmt: skip
def test_a_run_name_cannot_leave_the_output_root(tmp_path, monkeypatch, capsys, override):
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.chdir(root)
    code, _, err = cli(capsys, "run", "digits_teacher", "--set", "output.dir=runs", "--set", override)
    field = override.split("=")[0]
    assert_one_line_error(code, err, f"{field}:")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["root"], "nothing written anywhere"


# ----- secrets --------------------------------------------------------------------------------

SECRET = "sk-kdforge-test-7f3a9c1e5b2d"


@pytest.fixture
def keyed_server(tiny_lm_teacher, monkeypatch):
    """kdforge's completions server for the tiny LM, requiring SECRET as its Bearer key."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = CompletionEngine(
        AutoModelForCausalLM.from_pretrained(tiny_lm_teacher).eval(),
        AutoTokenizer.from_pretrained(tiny_lm_teacher),
        "tiny",
    )
    server = make_server(engine, port=0, api_key=SECRET)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def all_text_under(folder: Path) -> str:
    return "\n".join(p.read_bytes().decode("latin-1") for p in folder.rglob("*") if p.is_file())


def test_a_served_teachers_key_never_reaches_logs_reports_or_cards(
    tmp_path, tiny_lm_teacher, keyed_server, text, monkeypatch, capsys
):
    monkeypatch.setenv("KDFORGE_TEST_API_KEY", SECRET)
    monkeypatch.setenv("HF_TOKEN", SECRET + "-hf")  # an unrelated secret in the environment
    teacher = {"signal": "served", "url": keyed_server, "api_key_env": "KDFORGE_TEST_API_KEY", "k": 8}
    recipe = lm_recipe(tmp_path / "runs", tiny_lm_teacher, text, teacher=teacher,
                       student={"model": str(tiny_lm_teacher)})  # fmt: skip
    with pytest.raises(SystemExit) as done:
        main(["run", str(write_recipe(tmp_path / "r.yaml", recipe))])
    out, err = capsys.readouterr()
    assert done.value.code in (None, 0), err
    run_dir = tmp_path / "runs" / "tiny-lm"
    written = all_text_under(run_dir)
    assert (run_dir / "report.html").exists() and (run_dir / "model" / "README.md").exists()
    assert "KDFORGE_TEST_API_KEY" in (run_dir / "recipe.yaml").read_text()  # the variable's name, not its value
    assert SECRET not in written and SECRET not in out + err

    # a wrong key: the server's 401 is reported, and the key is still not shown
    monkeypatch.setenv("KDFORGE_TEST_API_KEY", "sk-wrong-" + SECRET[::-1])
    recipe["output"]["dir"] = str(tmp_path / "runs2")
    code, out, err = cli(capsys, "run", str(write_recipe(tmp_path / "r2.yaml", recipe)))
    assert_one_line_error(code, err, "answered 401", "KDFORGE_TEST_API_KEY")
    assert SECRET[::-1] not in err + out and SECRET not in err + out


def test_a_key_written_into_the_url_is_refused(tmp_path, tiny_lm_teacher, text, capsys):
    teacher = {"signal": "served", "url": f"http://user:{SECRET}@127.0.0.1:9"}
    recipe = lm_recipe(tmp_path / "runs", tiny_lm_teacher, text, teacher=teacher)
    code, out, err = cli(capsys, "validate", str(write_recipe(tmp_path / "r.yaml", recipe)))
    assert_one_line_error(code, err, "teacher.url: holds a password", "api_key_env")
    assert SECRET not in err + out
