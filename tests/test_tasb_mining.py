"""Teacher-mined hard negatives and the TAS-B sampler (topic-aware batches, balanced margins)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kdforge.data.mining import mine_negatives, teacher_margins
from kdforge.data.tasb import RandomPairSampler, TASBSampler, cluster_queries, margin_bins

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


# ---------------------------------------------------------------- bins and clusters


def test_margin_bins_edges():
    np.testing.assert_array_equal(margin_bins(np.array([0.0, 0.25, 0.49, 0.5, 1.0]), 2), [0, 0, 0, 1, 1])
    np.testing.assert_array_equal(margin_bins(np.array([-3.0, 7.0, 2.0]), 10), [0, 9, 5])  # max in the last bin
    np.testing.assert_array_equal(margin_bins(np.full(4, 2.5), 10), [0, 0, 0, 0])  # all equal: one bin
    np.testing.assert_array_equal(margin_bins(np.array([5.0, 1.0]), 1), [0, 0])
    assert margin_bins(np.array([]), 10).shape == (0,)
    b = margin_bins(np.linspace(0.0, 1.0, 101), 10)
    assert b.min() == 0 and b.max() == 9 and np.all(np.diff(b) >= 0)
    with pytest.raises(ValueError):
        margin_bins(np.array([0.0, np.nan]), 10)
    with pytest.raises(ValueError):
        margin_bins(np.array([0.0, 1.0]), 0)


def _blobs(seed: int, n_blobs: int = 4, per_blob: int = 30, dim: int = 8, normalise: bool = False):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_blobs, dim)) * 10.0
    labels = np.repeat(np.arange(n_blobs), per_blob)
    x = centres[labels] + rng.standard_normal((len(labels), dim)) * 0.3
    if normalise:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    perm = rng.permutation(len(labels))
    return x[perm].astype(np.float32), labels[perm]


@pytest.mark.parametrize("normalise", [False, True])
def test_cluster_queries_separates_blobs(normalise):
    x, labels = _blobs(seed=3, normalise=normalise)
    ids = cluster_queries(x, n_clusters=4, seed=0)
    assert ids.shape == labels.shape and ids.dtype == np.int64
    # A bijection between blobs and clusters: each blob is one cluster, and no two share.
    mapping = {int(b): set(ids[labels == b].tolist()) for b in range(4)}
    assert all(len(c) == 1 for c in mapping.values())
    assert len({next(iter(c)) for c in mapping.values()}) == 4
    np.testing.assert_array_equal(ids, cluster_queries(x, n_clusters=4, seed=0))


def test_cluster_queries_clips_to_the_number_of_queries():
    x, _ = _blobs(seed=4, n_blobs=2, per_blob=3)
    ids = cluster_queries(x, n_clusters=50, seed=1)
    assert ids.shape == (6,) and ids.min() >= 0 and ids.max() < 6
    assert np.all(cluster_queries(x, n_clusters=1, seed=1) == 0)


# ---------------------------------------------------------------- TAS-B sampler


def _pairs(seed: int = 0, cluster_sizes=(20, 13, 3, 16, 8)):
    """Pair examples of queries with 1-8 pairs each, queries clustered by contiguous id ranges."""
    rng = np.random.default_rng(seed)
    cluster = np.repeat(np.arange(len(cluster_sizes)), cluster_sizes)
    n_pairs = rng.integers(1, 9, size=len(cluster))
    pair_query = np.repeat(np.arange(len(cluster)), n_pairs)
    pair_margin = rng.normal(size=len(pair_query))
    return pair_query, pair_margin, cluster


def test_tasb_batches_are_full_and_single_cluster():
    pair_query, pair_margin, cluster = _pairs()
    sampler = TASBSampler(pair_query, pair_margin, cluster, batch_size=8, seed=5)
    # ceil(20/8) + ceil(13/8) + ceil(3/8) + ceil(16/8) + ceil(8/8) = 3 + 2 + 1 + 2 + 1
    assert len(sampler) == 9 * 8
    for epoch in range(4):
        batches = sampler.batches(epoch)
        assert len(batches) == 9
        for batch in batches:
            assert len(batch) == 8
            assert len({int(cluster[pair_query[i]]) for i in batch}) == 1


def test_tasb_each_query_once_per_epoch_besides_top_ups():
    pair_query, pair_margin, cluster = _pairs(seed=1)
    size = 8
    sampler = TASBSampler(pair_query, pair_margin, cluster, batch_size=size, seed=2)
    for epoch in range(3):
        batches = [[int(pair_query[i]) for i in b] for b in sampler.batches(epoch)]
        for c in np.unique(cluster):
            members = set(np.flatnonzero(cluster == c).tolist())
            mine = [b for b in batches if set(b) <= members]
            assert len(mine) == -(-len(members) // size)
            slots = Counter(q for b in mine for q in b)
            assert set(slots) == members  # every query of the cluster had a batch
            if len(members) >= size:
                assert all(len(set(b)) == size for b in mine)  # top-ups are distinct in a batch
                assert all(n in (1, 2) for n in slots.values())
                assert sum(n - 1 for n in slots.values()) == len(mine) * size - len(members)
            else:  # the small cluster cycles through its queries
                assert sorted(slots.values()) == sorted(Counter(np.resize(range(len(members)), size)).values())
        # cluster of 16 (= 2 batches) and of 8 (= 1 batch): no top-ups at all
        for c in (3, 4):
            ids = [q for b in batches for q in b if cluster[q] == c]
            assert len(ids) == len(set(ids))


def test_tasb_pairs_belong_to_their_query_and_the_loader_sees_the_batches():
    pair_query, pair_margin, cluster = _pairs(seed=2)
    sampler = TASBSampler(pair_query, pair_margin, cluster, batch_size=8, seed=9)
    sampler.set_epoch(2)
    loader = DataLoader(torch.arange(len(pair_query)), batch_size=8, sampler=sampler)
    seen = [b.tolist() for b in loader]
    assert seen == sampler.batches(2)
    assert sum(len(b) for b in seen) == len(sampler)


def test_tasb_is_deterministic_given_seed_and_epoch():
    pair_query, pair_margin, cluster = _pairs(seed=3)
    a = TASBSampler(pair_query, pair_margin, cluster, batch_size=8, seed=11)
    b = TASBSampler(pair_query, pair_margin, {int(q): int(c) for q, c in enumerate(cluster)}, batch_size=8, seed=11)
    a.set_epoch(3)
    b.set_epoch(3)
    assert list(a) == list(b)
    assert list(a) == [i for batch in a.batches(3) for i in batch]
    b.set_epoch(4)
    assert list(a) != list(b)
    assert len(list(b)) == len(a)  # same epoch length every epoch
    c = TASBSampler(pair_query, pair_margin, cluster, batch_size=8, seed=12)
    c.set_epoch(3)
    assert list(a) != list(c)
    # the order of clusters across batches is reshuffled each epoch
    orders = {tuple(int(cluster[pair_query[batch[0]]]) for batch in a.batches(e)) for e in range(6)}
    assert len(orders) > 1


def _skewed_query():
    """One query with 100 pairs: 90 in margin bin 0, 10 spread over bins 1-9."""
    rng = np.random.default_rng(0)
    low = rng.uniform(0.0, 0.09, size=90)
    high = np.array([0.15, 0.17, 0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85, 1.0])
    margin = np.concatenate([low, high])
    margin[0] = 0.0  # pins the range to [0, 1]
    return np.zeros(100, dtype=np.int64), margin


def _chi_square(counts: np.ndarray) -> float:
    expected = counts.sum() / len(counts)
    return float(((counts - expected) ** 2 / expected).sum())


def test_balanced_margin_sampling_is_uniform_over_non_empty_bins():
    pair_query, margin = _skewed_query()
    bins = margin_bins(margin, 10)
    assert np.bincount(bins, minlength=10).tolist() == [90, 2, 1, 1, 1, 1, 1, 1, 1, 1]

    def drawn_bins(sampler_cls):
        # a batch of 50 from a one-query cluster cycles it: 50 draws of its pair per epoch
        sampler = sampler_cls(pair_query, margin, np.zeros(1, dtype=np.int64), batch_size=50, seed=7)
        idx = np.concatenate([np.ravel(sampler.batches(e)) for e in range(40)])
        return np.bincount(bins[idx], minlength=10)

    tasb = drawn_bins(TASBSampler)
    assert tasb.sum() == 2000
    # 9 degrees of freedom: P(chi2 > 27.88) = 0.001 under uniform bins
    assert _chi_square(tasb) < 27.88
    uniform = drawn_bins(RandomPairSampler)
    assert uniform[0] / uniform.sum() > 0.8  # uniform pair sampling follows the skew
    assert _chi_square(uniform) > 1000


def test_random_baseline_matches_the_epoch_length_and_ignores_clusters():
    pair_query, pair_margin, cluster = _pairs(seed=4)
    tasb = TASBSampler(pair_query, pair_margin, cluster, batch_size=8, seed=1)
    rand = RandomPairSampler(pair_query, pair_margin, cluster, batch_size=8, seed=1)
    assert len(rand) == len(tasb)
    batches = rand.batches(0)
    assert len(batches) == len(tasb.batches(0)) and all(len(b) == 8 for b in batches)
    assert {int(pair_query[i]) for b in batches for i in b} == set(range(len(cluster)))
    mixed = sum(len({int(cluster[pair_query[i]]) for i in b}) > 1 for b in batches)
    assert mixed >= len(batches) // 2
    assert rand.batches(0) == RandomPairSampler(pair_query, pair_margin, cluster, batch_size=8, seed=1).batches(0)
    assert rand.batches(0) != rand.batches(1)


def test_sampler_rejects_bad_inputs():
    pair_query, pair_margin, cluster = _pairs()
    with pytest.raises(ValueError, match="no cluster"):
        TASBSampler(pair_query, pair_margin, {0: 0}, batch_size=8, seed=0)
    with pytest.raises(ValueError, match="query_cluster has"):
        TASBSampler(pair_query, pair_margin, cluster[:5], batch_size=8, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        TASBSampler(pair_query, pair_margin, cluster, batch_size=0, seed=0)
    with pytest.raises(ValueError, match="pair_margin"):
        TASBSampler(pair_query, pair_margin[:-1], cluster, batch_size=8, seed=0)
