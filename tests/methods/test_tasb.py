"""TAS-B batches (Hofstätter et al. 2021): topic-aware batches of margin-balanced pairs, the tasb_batches method
of the ranking tasks; the sampler, its clusters and bins, and how a recipe asks for it."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from kdforge.checks import load_recipe
from kdforge.data.tasb import RandomPairSampler, TASBSampler, cluster_queries, margin_bins
from kdforge.errors import RecipeError
from kdforge.methods import build_methods
from kdforge.runner import _sampler
from kdforge.tasks import TASKS
from test_tasks_encoders import _recipe, beir_dir  # noqa: F401  (beir_dir is a fixture)

# ---------------------------------------------------------------- the method


def _ranking(beir_dir, tmp_path, *overrides):  # noqa: F811
    objective = [{"loss": "margin_mse", "field": "scores"}]
    return _recipe(
        "ranking", beir_dir, tmp_path, objective, *overrides, data={"negatives": 6, "negatives_per_example": 2}
    )


def test_the_method_composes_single_topic_batches_and_the_task_random_ones_without_it(beir_dir, tmp_path):  # noqa: F811
    plain = TASKS.get("ranking")(_ranking(beir_dir, tmp_path))
    assert isinstance(plain.train_sampler(0), RandomPairSampler)
    # 6 queries, batch 4: the default of Q / (2 * batch size) clusters is 1
    expected = {"training_examples": 18, "training_queries": 6, "sampler": "random", "query_clusters": 1}
    assert plain.training_info(3) == expected

    recipe = _ranking(beir_dir, tmp_path, "methods=[{name: tasb_batches, clusters: 2, bins: 3}]")
    task = TASKS.get("ranking")(recipe)
    (method,) = build_methods(recipe, task)
    sampler = method.train_sampler(0)
    # the method's order replaces the task's in the runner
    assert isinstance(_sampler(task, [method], 0), TASBSampler) and isinstance(task.train_sampler(0), RandomPairSampler)
    assert isinstance(sampler, TASBSampler) and sampler.bins == 3
    clusters = task.query_clusters(2)
    assert np.array_equal(clusters, cluster_queries(task.triples.query_embeddings, 2, seed=0))
    for batch in sampler.batches(0):
        assert len({int(clusters[task.triples.query[i]]) for i in batch}) == 1
    info = {**task.training_info(3), **method.training_info(3)}
    assert info == {"training_examples": 18, "training_queries": 6, "sampler": "tasb", "query_clusters": 2}


@pytest.mark.parametrize(("key", "value"), [("sampler", "tasb"), ("sampler", "random"), ("clusters", 2), ("bins", 5)])
def test_the_old_data_settings_are_refused_with_the_new_spelling(tmp_path, key, value):
    with pytest.raises(RecipeError, match=rf"^data.{key} moved to the recipe's methods list; for TAS-B batches"
                       r" write methods: \[\{name: tasb_batches") as e:  # fmt: skip
        load_recipe("sparse_retriever_scifact", [f"data.{key}={value}"])
    assert "\n" not in str(e.value) and f"remove data.{key}" in str(e.value)


def test_the_bundled_ranking_recipe_lists_it():
    assert load_recipe("ranking_tasb_scifact").methods == [{"name": "tasb_batches", "bins": 10}]
    assert load_recipe("sparse_retriever_scifact").methods == []  # random batches, as before


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
