import pytest
import torch

from kdforge.errors import CacheError
from kdforge.losses.logits import forward_kl
from kdforge.outputs import ModelOutputs
from kdforge.signals.base import TeacherSignal
from kdforge.signals.cache_reader import CacheReader
from kdforge.signals.cache_store import CacheWriter, FieldSpec, topk_of
from kdforge.signals.cached import CachedTeacher, split_outputs
from kdforge.signals.ensemble import EnsembleTeacher


class Model(TeacherSignal):
    """A deterministic 'online' teacher: logits are a function of the input ids."""

    def __init__(self, vocab=40, seed=0):
        self.table = torch.randn(100, vocab, generator=torch.Generator().manual_seed(seed)) * 3

    def outputs(self, batch, fields):
        return ModelOutputs(logits=self.table[batch["input_ids"]])


def _batches():
    """Right-padded sequences of 2..6 tokens, 3 per batch, in dataset order."""
    g = torch.Generator().manual_seed(5)
    lengths = [6, 2, 4, 5, 3, 6, 1, 4]
    rows = [torch.randint(1, 100, (n,), generator=g) for n in lengths]
    batches = []
    for start in range(0, len(rows), 3):
        chunk = rows[start : start + 3]
        width = max(len(r) for r in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for i, r in enumerate(chunk):
            ids[i, : len(r)], mask[i, : len(r)] = r, 1
        batches.append(
            {"input_ids": ids, "attention_mask": mask, "example_index": torch.arange(start, start + len(chunk))}
        )
    return batches, len(rows)


def _write_token_cache(directory, teacher, k=5, dtype="float32"):
    batches, n = _batches()
    fields = {"logits": FieldSpec(kind="topk", layout="token", dtype=dtype, k=k, vocab=40)}
    writer = CacheWriter.open(directory, fingerprint={"teacher": "t"}, fields=fields, examples=n, shard_examples=3)
    for batch in batches:
        for example in split_outputs(teacher.outputs(batch, frozenset({"logits"})), batch, fields, 1.0):
            writer.add(example)
    writer.close()
    return batches


def test_token_cache_gives_the_teachers_topk_at_each_unpadded_position(tmp_path):
    teacher = Model()
    batches = _write_token_cache(tmp_path / "c", teacher)
    cached = CachedTeacher(CacheReader(tmp_path / "c"))
    shuffled = {key: value.flip(0) for key, value in batches[1].items()}  # any order of examples
    ids, log_p = cached.outputs(shuffled, frozenset({"logits"})).logits
    dense = teacher.outputs(shuffled, frozenset({"logits"})).logits
    assert ids.shape == (3, shuffled["input_ids"].shape[1], 5)
    ref_ids, ref_log_p, _ = topk_of(dense, 5, 1.0)
    mask = shuffled["attention_mask"].bool()
    assert torch.equal(ids[mask], ref_ids[mask])
    torch.testing.assert_close(log_p[mask], ref_log_p[mask], rtol=0, atol=1e-5)
    assert torch.isfinite(log_p).all()  # padded positions too
    # a divergence against the cached teacher equals the one against the dense teacher's top-k
    student = torch.randn(dense.shape)
    assert forward_kl(student, (ids, log_p), mask=mask).item() == pytest.approx(
        forward_kl(student, (ref_ids, ref_log_p), mask=mask).item(), rel=1e-5
    )


def test_example_layout_for_class_logits_and_embeddings(tmp_path):
    logits, emb = torch.randn(7, 10), torch.randn(7, 4)
    fields = {
        "logits": FieldSpec(kind="topk", dtype="float16", k=10, vocab=10),
        "embeddings": FieldSpec(kind="dense", dtype="float32", width=4),
    }
    writer = CacheWriter.open(tmp_path / "c", fingerprint={}, fields=fields, examples=7, shard_examples=4)
    batch = {"example_index": torch.arange(7)}
    for example in split_outputs(ModelOutputs(logits=logits, embeddings=emb), batch, fields, 2.0):
        writer.add(example)
    writer.close()
    out = CachedTeacher(CacheReader(tmp_path / "c")).outputs(
        {"example_index": torch.tensor([6, 0, 3])}, frozenset({"logits", "embeddings"})
    )
    ids, log_p = out.logits
    assert ids.shape == (3, 10)
    dense = torch.full((3, 10), -torch.inf).scatter(-1, ids, log_p)
    torch.testing.assert_close(dense, torch.log_softmax(logits[[6, 0, 3]] / 2.0, -1), rtol=0, atol=2e-3)
    torch.testing.assert_close(out.embeddings, emb[[6, 0, 3]])


def test_missing_field_or_index_is_a_clear_error(tmp_path):
    _write_token_cache(tmp_path / "c", Model())
    cached = CachedTeacher(CacheReader(tmp_path / "c"))
    with pytest.raises(CacheError, match="holds logits, not embeddings"):
        cached.outputs({"example_index": torch.tensor([0])}, frozenset({"embeddings"}))
    with pytest.raises(CacheError, match="needs 'example_index'"):
        cached.outputs({"input_ids": torch.zeros(1, 2)}, frozenset({"logits"}))
    with pytest.raises(CacheError, match="6 positions for an example but the batch has 2"):
        cached.outputs(
            {"example_index": torch.tensor([0]), "input_ids": torch.zeros(1, 2, dtype=torch.long)},
            frozenset({"logits"}),
        )


def test_an_ensemble_of_a_cached_and_an_online_teacher(tmp_path):
    first, second = Model(seed=0), Model(seed=1)
    batches = _write_token_cache(tmp_path / "c", first, k=40)  # k = V: the cache is complete
    ensemble = EnsembleTeacher([CachedTeacher(CacheReader(tmp_path / "c")), second], [0.5, 0.5])
    batch = batches[0]
    ids, log_p = ensemble.outputs(batch, frozenset({"logits"})).logits
    expected = 0.5 * torch.softmax(first.table[batch["input_ids"]], -1) + 0.5 * torch.softmax(
        second.table[batch["input_ids"]], -1
    )
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(log_p.exp()[mask], expected.gather(-1, ids)[mask], rtol=1e-4, atol=1e-6)
