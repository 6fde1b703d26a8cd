"""Faults outside training: a teacher cache killed or stopped while it is written, a served teacher
that restarts while a client waits. Nothing written is lost, and the end result is the same."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from kdforge.signals.cache_reader import CacheReader
from kdforge.signals.cache_store import read_manifest
from kdforge.signals.served import CompletionsClient, topk_logprobs


def _cache_command(teacher: Path, out: Path, cache: Path) -> list[str]:
    sets = [f"output.dir={out}", f"teacher.model={teacher}", "teacher.signal=cache", f"teacher.path={cache}",
            "teacher.temperature=8.0", "teacher.k=3", "data.train_limit=300"]  # fmt: skip
    return [sys.executable, "-m", "kdforge", "cache", "digits_kd", *[x for s in sets for x in ("--set", s)],
            "--batch-size", "1", "--shard-examples", "5"]  # fmt: skip


def _env(fault: str | None = None) -> dict[str, str]:
    env = {**os.environ, "KDFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    env.pop("KDFORGE_FAULT", None)
    if fault:
        env["KDFORGE_FAULT"] = fault
    return env


def _same_examples(a: Path, b: Path) -> None:
    """Two caches hold the same outputs for every example (their shard boundaries may differ)."""
    left, right = CacheReader(a), CacheReader(b)
    assert len(left) == len(right) > 0
    for i in range(len(left)):
        x, y = left.example(i), right.example(i)
        assert x.keys() == y.keys()
        for name in x:
            assert all(torch.equal(p, q) for p, q in zip(x[name], y[name], strict=True)), (i, name)


def _uninterrupted(tmp_path: Path, teacher: Path) -> Path:
    cache = tmp_path / "reference-cache"
    done = subprocess.run(_cache_command(teacher, tmp_path, cache), env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return cache


def test_a_cache_killed_between_a_shard_and_its_manifest_finishes_the_same(tmp_path, digits_teacher):
    cache = tmp_path / "cache"
    command = _cache_command(digits_teacher, tmp_path, cache)
    killed = subprocess.run(command, env=_env("cache_shard@3"), capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL
    # shard 3 is on disk but the manifest, written after it, lists shards 0-2 only
    assert (cache / "shard-00003.safetensors").exists() and len(read_manifest(cache).shards) == 3
    done = subprocess.run(command, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert read_manifest(cache).complete
    _same_examples(cache, _uninterrupted(tmp_path, digits_teacher))


def test_sigterm_stops_a_cache_cleanly_and_a_rerun_finishes_it(tmp_path, digits_teacher):
    cache = tmp_path / "cache"
    command = _cache_command(digits_teacher, tmp_path, cache)
    proc = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (cache / "shard-00002.safetensors").exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert re.fullmatch(r"stopped: stopped by SIGTERM: \d+ of \d+ examples are in .*; run the same kdforge cache"
                        r" command again to finish it\n", err.replace("\n", " ").strip() + "\n"), err  # fmt: skip
    partial = read_manifest(cache)
    assert not partial.complete and partial.shards
    done = subprocess.run(command, env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert read_manifest(cache).shards[: len(partial.shards)] == partial.shards  # kept, not written again
    _same_examples(cache, _uninterrupted(tmp_path, digits_teacher))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(model: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kdforge", "serve-teacher", str(model), "--port", str(port)],
        env=_env(), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    seen = ""
    while "serving" not in seen:
        line = proc.stderr.readline()
        assert line, f"the server did not start: {seen}"
        seen += line
    return proc


def test_a_client_retries_until_a_restarted_server_answers(tmp_path, tiny_lm_teacher):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    prompt = [[3, 9, 27, 5]]
    server = _serve(tiny_lm_teacher, port)
    try:
        before = topk_logprobs(CompletionsClient(url, retries=0), prompt, k=4)
        server.send_signal(signal.SIGTERM)  # a stopped container: the port is released, exit 0
        _, err = server.communicate(timeout=30)
        assert server.returncode == 0 and "stopped" in err and "Traceback" not in err, err

        # a request while the server is down: backoff 0.25 s doubling, 8 retries (over a minute in all)
        result: dict = {}
        client = CompletionsClient(url, retries=8, backoff=0.25, timeout=30)
        waiting = threading.Thread(target=lambda: result.update(answer=topk_logprobs(client, prompt, k=4)))
        waiting.start()
        time.sleep(1.0)
        assert waiting.is_alive() and not result, "the client gave up while the server was down"
        server = _serve(tiny_lm_teacher, port)
        waiting.join(timeout=120)
        assert "answer" in result, "the client did not get an answer from the restarted server"
        (ids_a, lp_a), (ids_b, lp_b) = before[0], result["answer"][0]
        assert torch.equal(ids_a, ids_b) and torch.equal(lp_a, lp_b)
    finally:
        server.terminate()
        server.wait(timeout=30)
