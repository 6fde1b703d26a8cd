"""Output to a file or a pipe (a log, CI): tables printed whole, progress as plain lines."""

import os
import re
import subprocess
import sys
from pathlib import Path

from kdforge.cli import print_summary
from kdforge.console import make_console
from kdforge.progress import PlainProgress, counting_progress, training_progress

LONG_METRICS = ["ndcg_at_10_over_every_query_of_the_test_split", "recall_at_100_over_every_query_of_the_test_split"]


def stat(value: float) -> dict:
    return {"mean": value, "std": 0.0, "n": 1, "values": [value]}


def report_with_long_names() -> dict:
    role = {
        "metrics": {name: stat(0.5) for name in LONG_METRICS},
        "fidelity": {"top1_agreement": stat(0.9)},
        "params": 1_234_567,
        "throughput": stat(12345.0),
    }
    return {
        "name": "a-run-with-long-metric-names",
        "seeds": [0],
        "summary": {"teacher": role, "student": role},
        "runs": [{"seed": 0, "models": {"teacher": {}, "student": {}}}],
        "throughput_unit": "documents_per_second_on_this_machine",
    }


def test_the_summary_table_is_printed_whole_to_a_file(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")  # what a CI runner may set: no terminal's width to fit, whatever it says
    print_summary(report_with_long_names(), Path("runs/x"))
    printed = capsys.readouterr().out
    for name in [*LONG_METRICS, "teacher", "student", "top1_agreement", "documents_per_second_on_this_machine"]:
        assert name in printed
    assert "…" not in printed
    assert "1,234,567" in printed and "12,345" in printed


def test_a_console_given_a_width_keeps_it():
    console = make_console(width=50)
    assert console.width == 50


def test_progress_to_a_file_is_plain_lines_with_counts(capsys, monkeypatch):
    monkeypatch.setenv("KDFORGE_PROGRESS", "1")
    with counting_progress() as progress:
        assert isinstance(progress, PlainProgress)
        bar = progress.add_task("teacher answers", total=128)
        for _ in range(128):
            progress.advance(bar)
    lines = capsys.readouterr().err.splitlines()
    assert lines and all(line.strip() for line in lines)  # no blank lines
    assert all(re.fullmatch(r"teacher answers: \d+/128 \(\d+ s\)", line) for line in lines), lines
    counts = [int(re.search(r": (\d+)/", line).group(1)) for line in lines]
    assert counts[0] == 0 and counts[-1] == 128 and counts == sorted(set(counts))
    assert len(lines) <= 12  # a line per tenth, not one per item


def test_a_hidden_task_prints_nothing_and_a_resumed_one_starts_at_its_count(capsys, monkeypatch):
    monkeypatch.setenv("KDFORGE_PROGRESS", "1")
    with counting_progress(transient=True) as progress:
        hidden = progress.add_task("encoding queries", total=10, visible=False)
        progress.advance(hidden, 10)
        bar = progress.add_task("teacher cache", total=100, completed=40)
        progress.update(bar, completed=100)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines] == ["teacher cache: 40/100", "teacher cache: 100/100"]


def test_training_progress_lines_carry_the_loss_terms(capsys, monkeypatch):
    monkeypatch.setenv("KDFORGE_PROGRESS", "1")
    with training_progress(True) as progress:
        bar = progress.add_task("student", total=20, completed=0, terms="")
        for step in range(1, 21):
            progress.update(bar, completed=step, terms=f"kd={1 / step:.4f}")
    lines = capsys.readouterr().err.splitlines()
    assert lines[-1].startswith("student: 20/20 kd=0.0500 (")
    assert len(lines) <= 12


def test_off_means_off_also_to_a_file(capsys, monkeypatch):
    monkeypatch.setenv("KDFORGE_PROGRESS", "0")
    with counting_progress() as progress:
        progress.advance(progress.add_task("teacher answers", total=3), 3)
    assert capsys.readouterr().err == ""


def test_a_run_logged_to_files_has_progress_lines_and_a_whole_summary(tmp_path):
    env = {**os.environ, "KDFORGE_PROGRESS": "1", "COLUMNS": "80"}
    sets = ["training.epochs=null", "training.steps=20", "evaluation.throughput_repeats=1", f"output.dir={tmp_path}"]
    done = subprocess.run(
        [sys.executable, "-m", "kdforge", "run", "digits_teacher", *[a for s in sets for a in ("--set", s)]],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "" not in done.stderr.splitlines() and "\x1b[" not in done.stderr  # no blank lines, no escape codes
    assert re.search(r"^student: 20/20 \S+=\S+ \(\d+ s\)$", done.stderr, re.M), done.stderr
    assert "top1_agreement" in done.stdout and "…" not in done.stdout
