import json
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from kdforge.cli import app, main

runner = CliRunner()


def cli(*args, cwd=None):
    """Run the real entry point in a subprocess: exit codes and stderr as a user sees them."""
    env = {**os.environ, "KDFORGE_PROGRESS": "0", "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "kdforge", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_validate_wrong_field_prints_one_line_and_exits_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    from kdforge.recipe import find_recipe

    bad.write_text(find_recipe("digits_kd").read_text().replace("weight: 0.9", "weight: -0.9"))
    result = cli("validate", str(bad))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: objective[1].weight: must be >= 0, got -0.9"]
    assert "Traceback" not in result.stderr


def test_validate_names_every_wrong_field_one_line_each_and_exits_2(tmp_path):
    from kdforge.recipe import find_recipe

    bad = tmp_path / "bad.yaml"
    text = find_recipe("digits_kd").read_text().replace("weight: 0.9", "weight: -0.9").replace("lr: 0.01", "lr: 0")
    bad.write_text(text)
    result = cli("validate", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: objective[1].weight: must be >= 0, got -0.9",
        "error: training.lr: must be > 0, got 0",
    ]
    assert "Traceback" not in result.stderr


def test_validate_ok_and_set():
    result = cli("validate", "digits_kd", "--set", "training.lr=3e-4")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: digits-kd")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["run", "no_such_recipe.yaml"], "no such recipe file"),
        (["run", "digits_kd", "--set", "training.lr"], "expected KEY=VALUE"),
        (["run", "digits_kd", "--seeds", "a,b"], "--seeds a,b"),
        (["report", "/nonexistent/run"], "no report.json"),
    ],
)
def test_user_errors_exit_2_without_traceback(args, needle, tmp_path):
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr


def test_missing_teacher_folder_is_a_user_error(tmp_path):
    result = cli("run", "digits_kd", "--set", "teacher.model=runs/not-trained/model", cwd=tmp_path)
    assert result.returncode == 2
    assert "teacher.model: folder runs/not-trained/model does not exist" in result.stderr


def test_usage_error_exits_2():
    with pytest.raises(SystemExit) as info:
        main(["run"])
    assert info.value.code == 2


def test_list_shows_every_registered_component():
    from kdforge.losses import LOSS_MODULES, LOSSES
    from kdforge.tasks import TASKS

    result = runner.invoke(app, ["list"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    for name in [*LOSSES, *LOSS_MODULES, *TASKS, "online", "digits_kd"]:
        assert name in result.stdout


def test_run_with_seeds_then_report(tmp_path, digits_teacher):
    args = [
        "run",
        "digits_kd",
        "--seeds",
        "0,1",
        "--set",
        f"teacher.model={digits_teacher}",
        "--set",
        "output.dir=out",
        "--set",
        "training.epochs=null",
        "--set",
        "training.steps=10",
        "--set",
        "evaluation.throughput_batches=1",
        "--set",
        "evaluation.throughput_repeats=1",
    ]
    result = cli(*args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "out" / "digits-kd"
    report = json.loads((run_dir / "report.json").read_text())
    assert report["seeds"] == [0, 1]
    acc = report["summary"]["student"]["metrics"]["accuracy"]
    assert acc["n"] == 2 and acc["values"] == [r["models"]["student"]["metrics"]["accuracy"] for r in report["runs"]]
    assert report["comparison"]["runs"] == 2
    for seed in (0, 1):
        card = (run_dir / f"seed-{seed}" / "model" / "README.md").read_text()
        assert "Distilled with kdforge from the teacher" in card and "accuracy" in card
        assert (run_dir / f"seed-{seed}" / "baseline" / "model.safetensors").is_file()
    (run_dir / "report.html").unlink()
    again = cli("report", str(run_dir), cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert (run_dir / "report.html").stat().st_size > 10_000
    assert "better in" in again.stdout


def test_the_digits_demo_runs_end_to_end_by_name_with_one_seed(tmp_path):
    """`kdforge demo digits`; here with one seed (the command is the same, five seeds take longer)."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "kdforge", "demo", "digits", "--seeds", "0", "--output", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "student − baseline (accuracy)" in done.stdout
    report = json.loads((tmp_path / "digits-kd" / "report.json").read_text())
    assert set(report["summary"]) == {"teacher", "student", "baseline"} and report["comparison"]["runs"] == 1
    assert (tmp_path / "digits-kd" / "report.html").is_file() and (
        tmp_path / "digits-kd" / "model" / "README.md"
    ).is_file()


def test_the_lm_demo_runs_end_to_end_with_its_recipe_on_a_tiny_teacher(tmp_path, tiny_lm_teacher):
    """`make demo` runs `kdforge demo` (the SmolLM2 demo); here its --quick recipe, with the tiny teacher swapped in.

    Everything but the model is the demo's: built-in prompts, teacher-written answers cached
    with top-k, TAID, the baseline, samples side by side, the report.
    """
    import json
    import os
    import subprocess
    import sys

    sets = [
        f"teacher.model={tiny_lm_teacher}",
        "student.from_teacher.num_layers=2",
        "student.prune.intermediate=32",
        "generation.max_new_tokens=8",
        "training.steps=4",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "kdforge", "demo", "--quick", "--output", str(tmp_path)]
        + [arg for s in sets for arg in ("--set", s)],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "KDFORGE_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert done.returncode == 0, done.stderr
    run_dir = tmp_path / "demo-smollm2-quick"
    report = json.loads((run_dir / "report.json").read_text())
    assert set(report["summary"]) == {"teacher", "student", "baseline"}
    assert report["teacher_signal"]["signal"] == "cache" and report["throughput_unit"] == "tokens/s"
    assert [o["loss"] for o in report["objective"]] == ["taid", "cross_entropy"]
    samples = report["runs"][0]["samples"]
    assert len(samples) == 3 and all(s["prompt"] and "teacher" in s and "baseline" in s for s in samples)
    assert "sample 1:" in done.stdout and "student − baseline (perplexity)" in done.stdout
    assert (tmp_path / "generations").is_dir()  # the teacher's answers stay with the demo's output
    assert "Sample generations" in (run_dir / "report.html").read_text()
    # the student exported in the teacher's quantization, measured on the test split, in the report
    export = report["exports"][0]
    assert export["format"] == "GGUF Q4_1" and (run_dir / "student.Q4_1.gguf").stat().st_size == export["size_bytes"]
    assert "student GGUF Q4_1" in done.stdout and "Exports of the student" in (run_dir / "report.html").read_text()
