"""Teacher signals end to end: `kdforge cache` then a run that reads it; ensembles of kinds; served-teacher CLI."""

import json
import re
import subprocess
import sys
import time

import pytest

from conftest import tiny
from kdforge.commands import write_recipe_caches
from kdforge.errors import CacheError, RecipeError
from kdforge.runner import run_recipe
from kdforge.signals.cache_store import read_manifest


def _losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r and r.get("phase") == "student"]


def _cache_recipe(out, teacher, cache, *extra):
    return tiny(
        "digits_kd",
        out,
        f"teacher.model={teacher}",
        "teacher.signal=cache",
        f"teacher.path={cache}",
        "teacher.temperature=8.0",
        "evaluation.baseline=false",
        *extra,
    )


def test_a_run_from_a_complete_cache_matches_the_online_run(tmp_path, digits_teacher):
    cache = tmp_path / "cache"
    recipe = _cache_recipe(tmp_path / "cached", digits_teacher, cache, "teacher.k=10", "teacher.dtype=float32")
    [(path, manifest)] = write_recipe_caches(recipe)
    assert path == cache and manifest.complete and manifest.examples == 500
    assert manifest.fields["logits"].kind == "dense"  # 10 classes fit in k: raw logits, uncompressed
    assert manifest.kept_mass() == {}
    cached = run_recipe(recipe)
    online = run_recipe(
        tiny("digits_kd", tmp_path / "online", f"teacher.model={digits_teacher}", "evaluation.baseline=false")
    )
    got, expected = cached["summary"]["student"]["metrics"], online["summary"]["student"]["metrics"]
    assert got["accuracy"]["mean"] == pytest.approx(expected["accuracy"]["mean"], abs=1e-9)
    losses = [
        [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
        for run in (recipe.run_dir, tmp_path / "online" / "digits-kd")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    signal = cached["teacher_signal"]
    assert signal["signal"] == "cache" and signal["stored"] == {"logits": "dense"}
    assert "teacher" in cached["summary"]  # the cache names its model, which is evaluated for the report
    assert "teacher signal <b>cache</b>: logits dense" in (recipe.run_dir / "report.html").read_text()


def test_a_topk_cache_in_q8_trains_and_reports_the_kept_mass(tmp_path, digits_teacher):
    cache = tmp_path / "cache"
    recipe = _cache_recipe(tmp_path / "runs", digits_teacher, cache, "teacher.k=3", "teacher.dtype=q8")
    write_recipe_caches(recipe)
    report = run_recipe(recipe)
    kept = report["teacher_signal"]["kept_mass"]["logits"]
    assert "the cached logits kept" in (recipe.run_dir / "report.html").read_text()
    assert 0.3 <= kept < 1.0  # the top 3 of 10 classes hold at least 3/10 of the mass
    assert report["teacher_signal"]["bytes_per_position"] < 40  # 3 ids, 3 codes, a tail, an offset
    losses = _losses(recipe.run_dir)
    assert losses[-1] < losses[0]  # the top-3 distillation loss falls


def test_a_cache_for_another_run_is_refused_naming_the_difference(tmp_path, digits_teacher):
    cache = tmp_path / "cache"
    write_recipe_caches(_cache_recipe(tmp_path / "a", digits_teacher, cache, "teacher.k=4"))
    other_data = _cache_recipe(tmp_path / "b", digits_teacher, cache, "teacher.k=4", "data.split_seed=1")
    with pytest.raises(CacheError, match=r"made for another run: dataset \(cache"):
        run_recipe(other_data)
    other_k = _cache_recipe(tmp_path / "c", digits_teacher, cache, "teacher.k=5")
    with pytest.raises(CacheError, match=r"another run: settings"):
        run_recipe(other_k)
    with pytest.raises(CacheError, match="--overwrite"):
        write_recipe_caches(other_k)
    with pytest.raises(RecipeError, match=r"--k 7 differs from teacher.k = 4"):
        write_recipe_caches(_cache_recipe(tmp_path / "d", digits_teacher, cache, "teacher.k=4"), k=7)


def test_objective_temperature_must_match_the_cache(tmp_path, digits_teacher):
    with pytest.raises(RecipeError, match=r"objective\[1\].params.temperature: 8, but teacher holds log-probs at"):
        tiny("digits_kd", tmp_path, f"teacher.model={digits_teacher}", "teacher.signal=cache", "teacher.path=x")


def test_an_ensemble_of_a_cached_and_an_online_teacher_runs(tmp_path, digits_teacher):
    cache = tmp_path / "cache"
    members = (
        f"teacher={{signal: ensemble, weights: [1, 3], members: ["
        f"{{signal: cache, model: {digits_teacher}, path: {cache}, k: 5, temperature: 8.0}},"
        f"{{model: {digits_teacher}}}]}}"
    )
    recipe = tiny("digits_kd", tmp_path / "runs", members, "evaluation.baseline=false")
    [(path, _)] = write_recipe_caches(recipe)
    assert path == cache
    report = run_recipe(recipe)
    assert report["teacher_signal"]["signal"] == "ensemble" and report["teacher_signal"]["weights"] == [0.25, 0.75]
    assert report["teacher"].startswith("ensemble of ")
    assert "teacher" not in report["summary"]  # no single model to evaluate
    losses = _losses(recipe.run_dir)
    assert losses[-1] < losses[0]


def test_kdforge_cache_cli(tmp_path, digits_teacher):
    cache = tmp_path / "cache"
    args = [
        "--set", "output.dir=" + str(tmp_path), "--set", f"teacher.model={digits_teacher}",
        "--set", "teacher.signal=cache", "--set", f"teacher.path={cache}", "--set", "teacher.temperature=8.0",
    ]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "kdforge", "cache", "digits_kd", *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert re.search(r"cache: 500 examples, 500 positions, .* B/position\)$", done.stdout.strip())
    assert read_manifest(cache).complete
    bad = subprocess.run(
        [sys.executable, "-m", "kdforge", "cache", "digits_kd", *args, "--k", "3"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "--k 3 differs from teacher.k = 64" in bad.stderr and "Traceback" not in bad.stderr


def test_serve_teacher_cli_answers_on_loopback(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdforge.signals.served import CompletionsClient, topk_logprobs

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "lm")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdforge", "serve-teacher", str(tmp_path / "lm"), "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        seen = ""
        for _ in range(20):  # loading messages come first
            line = proc.stderr.readline()
            seen += line
            match = re.search(r"http://127.0.0.1:(\d+)/v1/completions", line)
            if match or not line:
                break
        assert match, seen
        client = CompletionsClient(f"http://127.0.0.1:{match.group(1)}", retries=5, backoff=0.2)
        [(ids, values)] = topk_logprobs(client, [[3, 9, 27]], k=4)
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=torch.tensor([[3, 9, 27]])).logits[0], -1).topk(4)
        assert torch.equal(ids, ref.indices)
        torch.testing.assert_close(values, ref.values, rtol=0, atol=1e-5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    start = time.time()
    busy = subprocess.run(
        [sys.executable, "-m", "kdforge", "serve-teacher", str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert busy.returncode == 2 and "MODEL_REF" in busy.stderr and time.time() - start < 120


def test_a_killed_kdforge_cache_resumes_after_its_last_complete_shard(tmp_path, digits_teacher):
    import os
    import signal

    cache = tmp_path / "cache"
    args = [
        "--set", "output.dir=" + str(tmp_path), "--set", f"teacher.model={digits_teacher}",
        "--set", "teacher.signal=cache", "--set", f"teacher.path={cache}", "--set", "teacher.temperature=8.0",
        "--set", "teacher.k=3", "--batch-size", "1", "--shard-examples", "5",
    ]  # fmt: skip
    command = [sys.executable, "-m", "kdforge", "cache", "digits_kd", *args]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (cache / "shard-00002.safetensors").exists():
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = read_manifest(cache)
    assert 0 < len(partial.shards) < 100 and not partial.complete
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = read_manifest(cache)
    assert resumed.complete and resumed.shards[: len(partial.shards)] == partial.shards  # kept, not rewritten
    fresh = tmp_path / "fresh"
    again = [
        *command[: command.index(f"teacher.path={cache}")],
        f"teacher.path={fresh}",
        *command[command.index(f"teacher.path={cache}") + 1 :],
    ]
    assert subprocess.run(again, capture_output=True, text=True, timeout=300).returncode == 0
    assert [s.sha256 for s in read_manifest(fresh).shards] == [s.sha256 for s in resumed.shards]
