"""`kdforge cache` under `accelerate launch` with 2 processes (gloo on the CPU) writes the cache one
process writes: each process runs the teacher over its share and writes its own shards, the main one
merges the partial manifests; any number of processes reads it back, and a killed run resumes.

``--multi_gpu`` is Accelerate's name for its torchrun launcher: ``--cpu`` alone starts a single
process. Without a visible GPU (CUDA_VISIBLE_DEVICES is emptied, so that both caches are computed
on the CPU and compare bit for bit) the processes join a gloo group.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import launch, run_launched
from kdforge.errors import CacheError
from kdforge.signals.cache_reader import CacheReader
from kdforge.signals.cache_store import (
    CacheWriter,
    ExampleOutputs,
    FieldSpec,
    merge_shares,
    prepare_shares,
    read_manifest,
)

EXAMPLES = 60  # 30 per process, 6 shards of 5 each


def _run(processes: int, *args: str, fault: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "KDFORGE_PROGRESS": "0", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("KDFORGE_FAULT", None)
    if fault:
        env["KDFORGE_FAULT"] = fault
    return run_launched([*launch(processes), *args], env=env, timeout=300)


def _cache(processes: int, teacher: Path, cache: Path, fault: str | None = None) -> subprocess.CompletedProcess:
    sets = [f"output.dir={cache.parent}", f"teacher.model={teacher}", "teacher.signal=cache", f"teacher.path={cache}",
            "teacher.temperature=8.0", "teacher.k=3", f"data.train_limit={EXAMPLES}"]  # fmt: skip
    return _run(processes, "-m", "kdforge", "cache", "digits_kd", *[x for s in sets for x in ("--set", s)],
                "--batch-size", "1", "--shard-examples", "5", fault=fault)  # fmt: skip


def _same_cache(a: Path, b: Path) -> None:
    """The same manifest (but for its shards) and, for every example, the same tensors."""
    left, right = CacheReader(a), CacheReader(b)
    x, y = left.manifest, right.manifest
    assert (x.examples, x.fields, x.fingerprint, x.complete) == (y.examples, y.fields, y.fingerprint, y.complete)
    assert x.kept_mass_sum.keys() == y.kept_mass_sum.keys()
    assert all(x.kept_mass_sum[n] == pytest.approx(y.kept_mass_sum[n]) for n in x.kept_mass_sum)
    assert len(left) == EXAMPLES
    for i in range(len(left)):
        p, q = left.example(i), right.example(i)
        assert p.keys() == q.keys()
        for name in p:
            assert all(torch.equal(s, t) for s, t in zip(p[name], q[name], strict=True)), (i, name)


@pytest.fixture(scope="module")
def one_process_cache(tmp_path_factory, digits_teacher) -> Path:
    cache = tmp_path_factory.mktemp("one") / "cache"
    done = _cache(1, digits_teacher, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    return cache


@pytest.fixture(scope="module")
def two_process_cache(tmp_path_factory, digits_teacher) -> Path:
    cache = tmp_path_factory.mktemp("two") / "cache"
    done = _cache(2, digits_teacher, cache)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count(f"{cache}: {EXAMPLES} examples") == 1  # one summary, the main process's
    return cache


def test_two_processes_write_the_cache_one_process_writes(one_process_cache, two_process_cache):
    _same_cache(two_process_cache, one_process_cache)
    shards = read_manifest(two_process_cache).shards
    assert [s.first for s in shards] == list(range(0, EXAMPLES, 5))
    assert {s.file[:10] for s in shards} == {"shard-r000", "shard-r001"}  # each process wrote its own
    # the partial manifests are merged into manifest.json and gone; every file left is listed
    assert sorted(p.name for p in two_process_cache.iterdir()) == sorted(["manifest.json", *(s.file for s in shards)])


_READ_SCRIPT = """
import sys
from pathlib import Path

import torch

from kdforge.errors import CacheError

from kdforge import distributed
from kdforge.signals.cache_reader import CacheReader

distributed.start_processes(cpu=True)
two, one, out = CacheReader(sys.argv[1]), CacheReader(sys.argv[2]), Path(sys.argv[3])
for i in range(len(one)):
    a, b = two.example(i), one.example(i)
    assert a.keys() == b.keys() and all(torch.equal(x, y) for n in a for x, y in zip(a[n], b[n], strict=True)), i
(out / f"read-{distributed.rank()}-of-{distributed.world_size()}").write_text(str(len(one)))
distributed.barrier()
"""


def test_two_processes_read_the_two_process_cache(tmp_path, one_process_cache, two_process_cache):
    script = tmp_path / "read_cache.py"
    script.write_text(_READ_SCRIPT)
    done = _run(2, str(script), str(two_process_cache), str(one_process_cache), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(2):
        assert (tmp_path / f"read-{rank}-of-2").read_text() == str(EXAMPLES)


def test_a_killed_two_process_cache_resumes_with_two_and_equals_the_uninterrupted_one(
    tmp_path, digits_teacher, one_process_cache
):
    cache = tmp_path / "cache"
    killed = _cache(2, digits_teacher, cache, fault="cache_shard@2")
    assert killed.returncode != 0
    partial = [read_manifest(cache, f"manifest-r{r:03d}-of-002.json") for r in range(2)]
    assert not read_manifest(cache).complete and not any(p.complete for p in partial)
    kept = [s for p in partial for s in p.shards]
    assert 0 < len(kept) < EXAMPLES // 5
    done = _cache(2, digits_teacher, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"process \d resuming after example \d+ of \[\d+, \d+\)", " ".join(done.stderr.split()))
    final = read_manifest(cache).shards
    assert all(shard in final for shard in kept)  # what was done before is kept, not written again
    _same_cache(cache, one_process_cache)


def test_a_killed_two_process_cache_finished_by_one_process_is_the_same(tmp_path, digits_teacher, one_process_cache):
    """Another number of processes does not continue the shares: it writes the cache again, and
    leaves no file of the killed run behind."""
    cache = tmp_path / "cache"
    assert _cache(2, digits_teacher, cache, fault="cache_shard@1").returncode != 0
    done = _cache(1, digits_teacher, cache)
    assert done.returncode == 0, done.stderr[-3000:]
    _same_cache(cache, one_process_cache)
    assert sorted(p.name for p in cache.iterdir()) == [
        "manifest.json",
        *(f"shard-{i:05d}.safetensors" for i in range(12)),
    ]


# ------------------------------------------- the shares' files, in one process (no launcher)

FIELDS = {"emb": FieldSpec(kind="dense", dtype="float32", width=2)}
PRINT = {"teacher": "t"}


def _share(directory: Path, rank: int, world: int, bounds: tuple[int, int], upto: int) -> CacheWriter:
    """Process ``rank`` of ``world`` writes its share's examples up to ``upto`` (example i holds i)."""
    writer = CacheWriter.open_share(
        directory, fingerprint=PRINT, fields=FIELDS, rank=rank, world=world, bounds=bounds, shard_examples=2
    )
    for i in range(writer.start, upto):
        writer.add(ExampleOutputs(rows={"emb": (torch.full((1, 2), float(i)),)}))
    return writer


def _values(directory: Path) -> list[float]:
    reader = CacheReader(directory)
    return [float(reader.example(i)["emb"][0][0, 0]) for i in range(len(reader))]


def test_shares_merge_in_order_and_a_rerun_with_another_world_starts_over(tmp_path):
    cache = tmp_path / "cache"
    assert not prepare_shares(cache, fingerprint=PRINT, fields=FIELDS, examples=10, world=2)
    _share(cache, 0, 2, (0, 5), 4).flush()  # stopped: 4 of 5
    _share(cache, 1, 2, (5, 10), 10).close()
    # three processes now: the two shares are removed, and nothing of them is resumed
    assert not prepare_shares(cache, fingerprint=PRINT, fields=FIELDS, examples=10, world=3)
    assert not list(cache.glob("manifest-r*")) and not list(cache.glob("shard-r*"))
    for rank, bounds in enumerate([(0, 4), (4, 7), (7, 10)]):
        writer = _share(cache, rank, 3, bounds, bounds[1])
        assert writer.first == bounds[0] and writer.close().cached_examples == bounds[1] - bounds[0]
    merged = merge_shares(cache, 3)
    assert merged.complete and [s.first for s in merged.shards] == [0, 2, 4, 6, 7, 9]
    assert _values(cache) == [float(i) for i in range(10)]
    assert prepare_shares(cache, fingerprint=PRINT, fields=FIELDS, examples=10, world=2)  # complete: nothing to do


def test_a_merge_with_an_unfinished_share_is_refused(tmp_path):
    cache = tmp_path / "cache"
    prepare_shares(cache, fingerprint=PRINT, fields=FIELDS, examples=10, world=2)
    _share(cache, 0, 2, (0, 5), 5).close()
    _share(cache, 1, 2, (5, 10), 7).flush()
    with pytest.raises(CacheError, match=r"manifest-r001-of-002.json: process 1 did not finish its share"):
        merge_shares(cache, 2)
    assert not read_manifest(cache).complete
