"""Topic-aware, balanced-margin batches (TAS-B) for distilling a dense ranker.

TAS-B (Hofstätter et al., SIGIR 2021, "Efficiently Teaching an Effective Dense
Retriever with Balanced Topic Aware Sampling") changes only which training pairs
share a batch:

- **topic-aware**: the training queries are clustered once with k-means on the
  teacher's query embeddings (:func:`cluster_queries`), and every batch takes all
  its queries from one cluster, so the in-batch negatives of a query are documents
  of related queries, i.e. informative ones;
- **balanced margins**: each query has many (positive, negative) pairs scored by
  the teacher. Drawn uniformly, most pairs are easy (a large margin
  ``t(q, pos) - t(q, neg)``). The pairs of a query are split into equal-width
  margin bins (:func:`margin_bins`); a non-empty bin is drawn uniformly, then a
  pair uniformly inside it, so every level of difficulty is seen equally often.

:class:`TASBSampler` yields pair-example indices in the engine's sampler contract
(see :class:`kdforge.engine.sampler.EpochShuffleSampler`): a flat stream that the
``DataLoader`` cuts into consecutive chunks of ``batch_size``, regenerated exactly
from ``(seed, epoch)``, so a resumed run skips the batches it already saw and sees
the rest unchanged. :class:`RandomPairSampler` is the ablation baseline with the
same interface and epoch length: random queries, a uniformly random pair each.

A recipe asks for TAS-B batches with the ``tasb_batches`` method
(:mod:`kdforge.methods.tasb`); without it the ranking tasks order their pairs with
:class:`RandomPairSampler`.

Deliberate difference from the reference implementation (matchmaker's
``tas_balanced_training_loader.py``): there, a cluster that runs out of queries
mid-batch hands the rest of the batch to the next cluster. Here a cluster's last
partial batch is topped up with other queries of the *same* cluster, so every
batch is single-topic: the property the method relies on, and one that the tests
can check batch by batch. The top-up queries appear twice in the epoch.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import faiss
import numpy as np
from torch.utils.data import Sampler


def cluster_queries(query_emb: np.ndarray, n_clusters: int, seed: int, *, niter: int = 20) -> np.ndarray:
    """k-means cluster id of each query, from the teacher's query embeddings.

    The paper clustered 400k MS MARCO training queries into 2000 clusters (about 200
    queries each, i.e. a few batches of its size per cluster); a recipe should pick
    ``n_clusters`` near ``Q / (a few batch sizes)``, so each cluster yields several
    batches and few need topping up.

    Args:
        query_emb: [Q, D] teacher query embeddings. When every row has unit norm the
            clustering is spherical (centroids renormalised, assignment by inner
            product), matching a cosine-scored teacher.
        n_clusters: wanted number of clusters; clipped to ``Q``.
        seed: k-means++ seeding seed; the result is deterministic given it.
        niter: k-means iterations.

    Returns:
        [Q] int64 cluster ids in ``[0, min(n_clusters, Q))`` (an id may go unused).
    """
    x = np.asarray(query_emb)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"query_emb must be a non-empty 2-d array [Q, D], got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("query_emb holds NaN or infinite values")
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    x = np.ascontiguousarray(x, dtype=np.float32)  # faiss reads C-contiguous float32 only
    k = min(int(n_clusters), len(x))
    if k == 1:
        return np.zeros(len(x), dtype=np.int64)
    spherical = bool(np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-3))
    # faiss's default initialisation (k random points) often puts two centroids in one
    # topic and leaves another topic merged, a minimum Lloyd iterations never leave;
    # k-means++ seeding spreads them (it costs about one Lloyd iteration). faiss
    # releases before k-means++ get a few restarts, keeping the best objective.
    plus_plus = getattr(faiss, "ClusteringInitMethod_KMEANS_PLUS_PLUS", None)
    init = {"init_method": plus_plus} if plus_plus is not None else {"nredo": 5}
    kmeans = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        seed=int(seed) % (2**31),  # faiss keeps the seed in a C int
        spherical=spherical,
        # faiss only warns below 39 points per centroid; small clusters are the point here
        min_points_per_centroid=1,
        verbose=False,
        **init,
    )
    kmeans.train(x)
    _, assigned = kmeans.index.search(x, 1)
    return assigned[:, 0].astype(np.int64)


def _bin_index(margins: np.ndarray, lo: np.ndarray, hi: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bin of each margin over its own [lo, hi] (elementwise arrays)."""
    width = hi - lo
    # A zero-width range (all margins equal) is one bin; avoid dividing by zero.
    scaled = np.where(width > 0, (margins - lo) / np.where(width > 0, width, 1.0), 0.0)
    # The maximum lands exactly on ``bins``: it belongs to the last bin.
    return np.minimum(np.floor(scaled * bins), bins - 1).astype(np.int64)


def margin_bins(margins: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bin index of each margin over ``[margins.min(), margins.max()]``.

    Args:
        margins: [P] teacher margins of one query's pairs.
        bins: number of bins (the paper's default is 10).

    Returns:
        [P] int64 bin indices in ``[0, bins)``; the maximum falls in the last bin, and
        all-equal margins all fall in bin 0.
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    m = np.asarray(margins, dtype=np.float64)
    if m.ndim != 1:
        raise ValueError(f"margins must be 1-d [P], got shape {m.shape}")
    if len(m) == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.all(np.isfinite(m)):
        raise ValueError("margins hold NaN or infinite values")
    return _bin_index(m, m.min(), m.max(), bins)


class _PairSampler(Sampler[int]):
    """Shared bookkeeping: the queries of the pair examples, their clusters, the epoch length.

    Query *ranks* (positions in the sorted array of distinct query ids) index every
    per-query table; pair examples are re-ordered by (query, margin bin, index) into
    one flat array, so a query's pairs, and each of its bins, are contiguous runs.
    """

    def __init__(
        self,
        pair_query: np.ndarray,
        pair_margin: np.ndarray,
        query_cluster: Mapping[int, int] | np.ndarray,
        batch_size: int,
        seed: int,
        bins: int = 10,
    ):
        pair_query = np.asarray(pair_query)
        pair_margin = np.asarray(pair_margin, dtype=np.float64)
        if pair_query.ndim != 1 or len(pair_query) == 0:
            raise ValueError(f"pair_query must be a non-empty 1-d array [P], got shape {pair_query.shape}")
        if not np.issubdtype(pair_query.dtype, np.integer):
            raise ValueError(f"pair_query must hold integer query ids, got dtype {pair_query.dtype}")
        if pair_margin.shape != pair_query.shape:
            raise ValueError(f"pair_margin has shape {pair_margin.shape}, pair_query {pair_query.shape}")
        if not np.all(np.isfinite(pair_margin)):
            raise ValueError("pair_margin holds NaN or infinite values")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if bins < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.bins = int(bins)
        self.epoch = 0

        #: [Qp] distinct query ids that own at least one pair, sorted
        self.queries, rank = np.unique(pair_query.astype(np.int64), return_inverse=True)
        n_queries = len(self.queries)

        cluster = self._clusters_of(self.queries, query_cluster)
        #: cluster id -> [n_c] query ranks, ascending; clusters in ascending id order
        self.cluster_members: dict[int, np.ndarray] = {int(c): np.flatnonzero(cluster == c) for c in np.unique(cluster)}
        self.num_batches = sum(-(-len(m) // self.batch_size) for m in self.cluster_members.values())

        # Margin bins per query, each over that query's own [min, max].
        lo = np.full(n_queries, np.inf)
        hi = np.full(n_queries, -np.inf)
        np.minimum.at(lo, rank, pair_margin)
        np.maximum.at(hi, rank, pair_margin)
        #: [P] margin bin of each pair example
        self.pair_bin = _bin_index(pair_margin, lo[rank], hi[rank], self.bins)

        # np.lexsort is stable and sorts by its last key first: by query, then bin.
        self._flat = np.lexsort((self.pair_bin, rank))
        flat_rank, flat_bin = rank[self._flat], self.pair_bin[self._flat]
        counts = np.bincount(rank, minlength=n_queries)
        self._query_start = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self._query_count = counts
        # One group per non-empty (query, bin).
        new_group = np.ones(len(self._flat), dtype=bool)
        new_group[1:] = (flat_rank[1:] != flat_rank[:-1]) | (flat_bin[1:] != flat_bin[:-1])
        self._group_start = np.flatnonzero(new_group)
        self._group_size = np.diff(np.append(self._group_start, len(self._flat)))
        groups_per_query = np.bincount(flat_rank[self._group_start], minlength=n_queries)
        self._query_first_group = np.concatenate([[0], np.cumsum(groups_per_query)[:-1]])
        self._query_groups = groups_per_query

    @staticmethod
    def _clusters_of(queries: np.ndarray, query_cluster: Mapping[int, int] | np.ndarray) -> np.ndarray:
        if isinstance(query_cluster, Mapping):
            missing = [int(q) for q in queries if int(q) not in query_cluster]
            if missing:
                raise ValueError(f"query_cluster has no cluster for queries {missing[:5]}")
            return np.array([int(query_cluster[int(q)]) for q in queries], dtype=np.int64)
        table = np.asarray(query_cluster)
        if table.ndim != 1:
            raise ValueError(f"query_cluster as an array must be 1-d [num queries], got shape {table.shape}")
        if queries.min() < 0 or queries.max() >= len(table):
            raise ValueError(f"query ids span [{queries.min()}, {queries.max()}] but query_cluster has {len(table)}")
        return table[queries].astype(np.int64)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, epoch: int) -> np.random.Generator:
        # SeedSequence mixes both words, so neighbouring (seed, epoch) give unrelated streams.
        return np.random.default_rng([self.seed % 2**64, int(epoch) % 2**64])

    def _balanced_pairs(self, rng: np.random.Generator, ranks: np.ndarray) -> np.ndarray:
        """[n] one pair per query rank: a non-empty margin bin uniformly, then a pair in it."""
        group = self._query_first_group[ranks] + rng.integers(0, self._query_groups[ranks])
        pos = self._group_start[group] + rng.integers(0, self._group_size[group])
        return self._flat[pos]

    def _uniform_pairs(self, rng: np.random.Generator, ranks: np.ndarray) -> np.ndarray:
        """[n] one pair per query rank, uniformly among the query's pairs."""
        pos = self._query_start[ranks] + rng.integers(0, self._query_count[ranks])
        return self._flat[pos]

    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches: ``len(self) // batch_size`` lists of ``batch_size`` pair indices."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        return iter([i for batch in self.batches(self.epoch) for i in batch])

    def __len__(self) -> int:
        return self.num_batches * self.batch_size


class TASBSampler(_PairSampler):
    """Topic-aware batches of balanced-margin pairs, over pair examples.

    Args:
        pair_query: [P] query id of each pair example (the dataset's items are pairs).
        pair_margin: [P] teacher margin ``t(q, pos) - t(q, neg)`` of each pair.
        query_cluster: query id -> cluster id, as a mapping or as an array indexed
            by query id (what :func:`cluster_queries` returns).
        batch_size: pairs per batch; must equal the ``DataLoader``'s batch size.
        seed: with the epoch, fixes the whole order.
        bins: margin bins per query.

    Each epoch, every cluster's queries are shuffled and cut into batches of
    ``batch_size``; a last partial batch is topped up with other queries of the same
    cluster (distinct within the batch when the cluster has at least ``batch_size``
    queries, cycling through the cluster otherwise). So each query with a pair is in
    exactly one batch of the epoch, apart from the top-up slots, and every batch's
    queries share one cluster. The batches of all clusters are then shuffled
    together, and each query slot gets a pair by balanced margin sampling.
    ``len(self) = batch_size * sum_c ceil(n_c / batch_size)``, the same every epoch.
    """

    def query_batches(self, rng: np.random.Generator) -> np.ndarray:
        """[num_batches, batch_size] query ranks of one epoch's batches, each batch one cluster."""
        size = self.batch_size
        out: list[np.ndarray] = []
        for members in self.cluster_members.values():
            members = rng.permutation(members)
            full, rest = divmod(len(members), size)
            out.extend(members[i * size : (i + 1) * size] for i in range(full))
            if not rest:
                continue
            if full:
                # Top up from queries that already had their batch: distinct within this batch.
                fill = rng.choice(members[: full * size], size=size - rest, replace=False)
                out.append(np.concatenate([members[full * size :], fill]))
            else:
                # A cluster smaller than a batch repeats its queries to fill it.
                out.append(np.resize(members, size))
        order = rng.permutation(len(out))
        return np.stack([out[i] for i in order])

    def batches(self, epoch: int) -> list[list[int]]:
        rng = self._rng(epoch)
        ranks = self.query_batches(rng)
        pairs = self._balanced_pairs(rng, ranks.ravel()).reshape(ranks.shape)
        return pairs.tolist()


class RandomPairSampler(_PairSampler):
    """The ablation baseline of :class:`TASBSampler`: random queries, a uniformly random pair each.

    Same constructor (``pair_margin`` and ``bins`` are checked but unused) and the same
    epoch length as :class:`TASBSampler` with the same ``query_cluster``, so the two
    compare at an equal number of steps. The epoch's query stream is a random
    permutation of all queries with a pair, continued by a second permutation for the
    slots beyond ``Q`` (the extra length TAS-B spends on top-ups); batches ignore
    clusters, and each query slot gets a pair uniformly among that query's pairs.
    """

    def batches(self, epoch: int) -> list[list[int]]:
        rng = self._rng(epoch)
        n_queries, length = len(self.queries), len(self)
        rounds = -(-length // n_queries)
        ranks = np.concatenate([rng.permutation(n_queries) for _ in range(rounds)])[:length]
        pairs = self._uniform_pairs(rng, ranks).reshape(self.num_batches, self.batch_size)
        return pairs.tolist()
