import json
import math

import pytest
import torch

from kdforge.errors import CacheError
from kdforge.signals.cache_reader import CacheReader, bytes_per_position
from kdforge.signals.cache_store import (
    MANIFEST,
    CacheWriter,
    ExampleOutputs,
    FieldSpec,
    decode_topk,
    encode_logprobs,
    read_manifest,
    topk_of,
)

FINGERPRINT = {"teacher": "aaa", "tokenizer": "bbb", "dataset": "ccc", "settings": {"temperature": 1.0, "k": 4}}


def _examples(n, vocab=50, seed=0):
    """Teacher logits per example, with 1..5 positions each (like sequences of different lengths)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1 + i % 5, vocab, generator=g) * 3 for i in range(n)]


def _fields(dtype="float32", k=4, vocab=50, dense_width=None):
    fields = {"logits": FieldSpec(kind="topk", dtype=dtype, k=k, vocab=vocab)}
    if dense_width:
        fields["embeddings"] = FieldSpec(kind="dense", dtype="float32", width=dense_width)
    return fields


def _write(directory, logits, *, dtype="float32", k=4, shard_examples=3, stop_after=None, dense=None, **kw):
    writer = CacheWriter.open(
        directory,
        fingerprint=kw.pop("fingerprint", FINGERPRINT),
        fields=_fields(dtype, k, logits[0].shape[-1], dense[0].shape[-1] if dense else None),
        examples=len(logits),
        shard_examples=shard_examples,
        **kw,
    )
    for i in range(writer.start, len(logits)):
        if stop_after is not None and i >= stop_after:
            return writer  # killed: pending examples never reach disk
        rows = {"logits": topk_of(logits[i], k, 1.0)}
        if dense:
            rows["embeddings"] = (dense[i],)
        writer.add(ExampleOutputs(rows))
    writer.close()
    return writer


def test_round_trip_equals_the_teachers_topk(tmp_path):
    logits = _examples(10)
    dense = [torch.randn(1 + i % 5, 8) for i in range(10)]
    _write(tmp_path / "c", logits, dense=dense)
    reader = CacheReader(tmp_path / "c", expected_fingerprint=FINGERPRINT)
    assert len(reader) == 10 and reader.manifest.complete and len(reader.manifest.shards) == 4
    for i in [0, 3, 9, 5]:
        got = reader.example(i)
        ids, log_p, _ = topk_of(logits[i], 4, 1.0)
        assert torch.equal(got["logits"][0], ids)
        torch.testing.assert_close(got["logits"][1], log_p, rtol=0, atol=1e-5)
        torch.testing.assert_close(got["embeddings"][0], dense[i])


@pytest.mark.parametrize("dtype,atol", [("float16", 2e-2), ("bfloat16", 0.1), ("q8", 0.07)])
def test_compressed_log_probs_keep_the_kept_mass_exactly(dtype, atol, tmp_path):
    logits = _examples(6)
    _write(tmp_path / dtype, logits, dtype=dtype)
    reader = CacheReader(tmp_path / dtype)
    for i in range(6):
        ids, log_p, tail = topk_of(logits[i], 4, 1.0)
        got_ids, got = reader.example(i)["logits"]
        assert torch.equal(got_ids, ids)
        # the decoded top-k sums to exactly 1 - tail, whatever the storage rounding
        torch.testing.assert_close(got.exp().sum(-1), 1 - tail, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got, log_p, rtol=0, atol=atol)


def test_q8_codes():
    lp = torch.tensor([0.0, -1.0 / 16, -3.0, -20.0, -math.inf])
    codes = encode_logprobs(lp, "q8")
    assert codes.dtype == torch.uint8 and codes.tolist() == [0, 1, 48, 255, 255]
    decoded = decode_topk(codes.unsqueeze(0), torch.tensor([0.5]), "q8")
    assert decoded.exp().sum().item() == pytest.approx(0.5, rel=1e-6)


def test_manifest_records_kept_mass_and_sizes(tmp_path):
    logits = _examples(7)
    _write(tmp_path / "c", logits, dtype="q8")
    manifest = read_manifest(tmp_path / "c")
    expected = torch.cat([topk_of(x, 4, 1.0)[1].exp().sum(-1) for x in logits]).mean().item()
    assert manifest.kept_mass()["logits"] == pytest.approx(expected, rel=1e-6)
    assert manifest.positions == sum(x.shape[0] for x in logits)
    # 4 ids (uint16) + 4 codes + a float32 tail per position, plus headers and offsets
    assert 4 * 2 + 4 + 4 <= bytes_per_position(tmp_path / "c") < 4 * 2 + 4 + 4 + 120


def test_a_killed_writer_resumes_from_its_last_complete_shard(tmp_path):
    logits = _examples(10)
    writer = _write(tmp_path / "c", logits, stop_after=7)  # shards of 3: two written, one example pending
    assert writer.start == 6 and not writer.complete
    (tmp_path / "c" / ".shard-00002.safetensors.tmp").write_bytes(b"half a shard")  # a write cut short
    with pytest.raises(CacheError, match="incomplete .6 of 10 examples"):
        CacheReader(tmp_path / "c")
    resumed = _write(tmp_path / "c", logits)
    assert resumed.complete
    _write(tmp_path / "fresh", logits)
    for i in range(10):
        a, b = CacheReader(tmp_path / "c").example(i), CacheReader(tmp_path / "fresh").example(i)
        assert all(torch.equal(x, y) for x, y in zip(a["logits"], b["logits"]))
    assert [s.sha256 for s in read_manifest(tmp_path / "c").shards] == [
        s.sha256 for s in read_manifest(tmp_path / "fresh").shards
    ]


def test_a_resume_rewrites_a_corrupt_last_shard(tmp_path):
    logits = _examples(10)
    _write(tmp_path / "c", logits, stop_after=7)
    shard = tmp_path / "c" / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])  # truncated after the manifest listed it
    writer = CacheWriter.open(tmp_path / "c", fingerprint=FINGERPRINT, fields=_fields(), examples=10, shard_examples=3)
    assert writer.start == 3


def test_fingerprint_mismatch_is_refused_naming_the_difference(tmp_path):
    _write(tmp_path / "c", _examples(4))
    other = {**FINGERPRINT, "teacher": "zzz", "settings": {"temperature": 2.0, "k": 4}}
    with pytest.raises(CacheError, match=r"another run: settings .*; teacher \(cache aaa, this run zzz\)"):
        CacheReader(tmp_path / "c", expected_fingerprint=other)
    with pytest.raises(CacheError, match="--overwrite"):
        _write(tmp_path / "c", _examples(4), fingerprint=other)
    _write(tmp_path / "c", _examples(4), fingerprint=other, overwrite=True)
    assert CacheReader(tmp_path / "c", expected_fingerprint=other).manifest.fingerprint == other


def test_corrupt_and_truncated_shards_are_named(tmp_path):
    _write(tmp_path / "c", _examples(9))
    shard = tmp_path / "c" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    reader = CacheReader(tmp_path / "c")
    reader.example(0)  # another shard: fine
    with pytest.raises(CacheError, match=r"shard-00001.safetensors: checksum mismatch"):
        reader.example(4)
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(CacheError, match=r"shard-00001.safetensors: truncated"):
        CacheReader(tmp_path / "c").example(3)
    shard.unlink()
    with pytest.raises(CacheError, match=r"shard-00001.safetensors: missing shard"):
        CacheReader(tmp_path / "c").example(3)


def test_not_a_cache(tmp_path):
    with pytest.raises(CacheError, match="no manifest.json"):
        CacheReader(tmp_path)
    (tmp_path / MANIFEST).write_text("{}")
    with pytest.raises(CacheError, match="not a kdforge cache manifest"):
        CacheReader(tmp_path)
    (tmp_path / MANIFEST).write_text(json.dumps({"format_version": 99, "fingerprint": {}, "fields": {}, "examples": 0}))
    with pytest.raises(CacheError, match="cache format 99"):
        CacheReader(tmp_path)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(CacheError, match="not a kdforge cache; choose another --output"):
        _write(tmp_path / "other", _examples(2))


def test_reader_keeps_few_shards_open(tmp_path):
    from kdforge.signals import cache_reader

    _write(tmp_path / "c", _examples(30), shard_examples=2)
    reader = CacheReader(tmp_path / "c")
    for i in range(30):
        reader.example(i)
    assert len(reader._open) == cache_reader.OPEN_SHARDS
    with pytest.raises(CacheError, match="outside"):
        reader.example(30)
