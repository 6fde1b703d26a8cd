"""The speed measurement after training: bounded by evaluation.throughput_seconds, and honest about it."""

import json
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny
from kdforge.eval import speed
from kdforge.eval.speed import timed_throughput
from kdforge.runner import run_recipe

BATCH = {"x": torch.zeros(4, 2)}


class FakeClock:
    """perf_counter for the speed module: each forward pass takes one 'second', and nothing else does."""

    def __init__(self):
        self.now = 0.0
        self.passes = 0

    def perf_counter(self) -> float:
        return self.now

    def forward(self, batch) -> None:
        self.now += 1.0
        self.passes += 1


def test_no_repeat_starts_once_the_seconds_have_passed(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(speed, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    measured = timed_throughput(clock.forward, BATCH, batches=2, repeats=10, seconds=5.0)
    # repeats of 2 s each: after the third, 6 s have passed; the warm-up pass is not counted
    assert measured.repeats == 3
    assert clock.passes == 1 + 3 * 2
    assert measured.rate == 4 * 2 / 2.0


def test_the_first_repeat_always_runs_and_without_a_bound_every_repeat_does(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(speed, "time", SimpleNamespace(perf_counter=clock.perf_counter))
    assert timed_throughput(clock.forward, BATCH, batches=3, repeats=4, seconds=0.5).repeats == 1
    assert timed_throughput(clock.forward, BATCH, batches=3, repeats=4, seconds=None).repeats == 4


def test_a_slow_forward_is_stopped_by_the_bound():
    def slow(batch):
        time.sleep(0.01)

    measured = timed_throughput(slow, BATCH, batches=1, repeats=1000, seconds=0.05)
    assert 1 <= measured.repeats < 1000


@pytest.mark.parametrize(
    "seconds, repeats, timed",
    [
        ("null", 2, 2),  # no bound: every repeat asked for
        ("1e-9", 50, 1),  # a bound any repeat exceeds: the first only
    ],
)
def test_the_report_records_the_repeats_timed(tmp_path, seconds, repeats, timed):
    recipe = tiny(
        "digits_teacher",
        tmp_path,
        "training.steps=3",
        f"evaluation.throughput_repeats={repeats}",
        f"evaluation.throughput_seconds={seconds}",
    )
    run_recipe(recipe)
    report = json.loads((recipe.run_dir / "report.json").read_text())
    assert report["runs"][0]["models"]["student"]["throughput_repeats"] == timed
