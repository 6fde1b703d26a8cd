"""Teacher-mined hard negatives (the TAS-B sampler, topic-aware batches of balanced margins, is the tasb_batches
method's: tests/methods/test_tasb.py)."""

from __future__ import annotations

import numpy as np
import pytest

from kdforge.data.mining import mine_negatives, teacher_margins

# ---------------------------------------------------------------- mining


def _planted(seed: int = 0, n_queries: int = 150, n_docs: int = 400, dim: int = 12):
    """Random embeddings; each query's positives are planted among its 8 nearest docs."""
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n_queries, dim)).astype(np.float32)
    d = rng.standard_normal((n_docs, dim)).astype(np.float32)
    scores = q.astype(np.float64) @ d.astype(np.float64).T
    top = np.argsort(-scores, axis=1)[:, :8]
    positives = [set(rng.choice(row, size=rng.integers(1, 5), replace=False).tolist()) for row in top]
    return q, d, scores, positives


def _brute_force(scores: np.ndarray, positives, k: int, skip_top: int = 0) -> np.ndarray:
    rows = []
    for row, pos in zip(scores, positives):
        ranked = [int(i) for i in np.argsort(-row, kind="stable") if int(i) not in pos]
        rows.append(ranked[skip_top : skip_top + k])
    return np.array(rows)


def test_negatives_exclude_positives_and_are_the_top_non_positives():
    q, d, scores, positives = _planted()
    negs = mine_negatives(q, d, positives, k=10)
    assert negs.shape == (150, 10) and negs.dtype == np.int64
    for row, pos in zip(negs, positives):
        assert not pos & set(row.tolist())
        assert len(set(row.tolist())) == 10
    np.testing.assert_array_equal(negs, _brute_force(scores, positives, 10))


def test_skip_top_passes_over_the_best_non_positives():
    q, d, scores, positives = _planted(seed=1)
    negs = mine_negatives(q, d, positives, k=6, skip_top=4)
    np.testing.assert_array_equal(negs, _brute_force(scores, positives, 6, skip_top=4))
    plain = mine_negatives(q, d, positives, k=10)
    np.testing.assert_array_equal(negs, plain[:, 4:10])


def test_mining_searches_past_a_query_with_many_positives_on_top():
    q, d, scores, positives = _planted(seed=2)
    # Query 0 owns its 60 best docs: the search must reach beyond them.
    positives[0] = set(np.argsort(-scores[0])[:60].tolist())
    negs = mine_negatives(q, d, positives, k=5, skip_top=2)
    np.testing.assert_array_equal(negs, _brute_force(scores, positives, 5, skip_top=2))
    assert not positives[0] & set(negs[0].tolist())


def test_too_few_non_positive_docs_raise():
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 4))
    d = rng.standard_normal((6, 4))
    mine_negatives(q, d, [{0, 1}, {2}], k=4)  # exactly enough for query 0
    with pytest.raises(ValueError, match="query 0"):
        mine_negatives(q, d, [{0, 1, 2}, {2}], k=4)
    with pytest.raises(ValueError, match="skip_top"):
        mine_negatives(q, d, [{0}, {2}], k=4, skip_top=2)
    with pytest.raises(ValueError, match="outside"):
        mine_negatives(q, d, [{6}, {2}], k=1)
    with pytest.raises(ValueError, match="entries"):
        mine_negatives(q, d, [{0}], k=1)


def test_teacher_margins():
    np.testing.assert_allclose(teacher_margins([3.0, 1.0], [1.0, 2.0]), [2.0, -1.0])
    np.testing.assert_allclose(teacher_margins([3.0, 1.0], [[1.0, 0.0], [2.0, 1.0]]), [[2.0, 3.0], [-1.0, 0.0]])
