"""The K-means core: same answer as scikit-learn, planted clusters recovered, k chosen, Ray paths;
the answer independent of row and block order, clusters numbered canonically."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from raybias.clustering.kmeans import (LocalBlocks, VectorBlocks, assign, canonical_layout, kmeans_dataset,
                                       kmeans_plusplus, lloyd_partial)
from raybias.clustering.select_k import candidate_ks, cluster_group
from raybias.config import config_from_dict


def blobs(n_per=(300, 250, 200, 350), dim=16, spread=1.0, sep=4.0, seed=0):
    """Planted Gaussian clusters: (X float32, true labels)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(len(n_per), dim)) * sep
    xs, ys = [], []
    for j, n in enumerate(n_per):
        xs.append(centres[j] + spread * rng.normal(size=(n, dim)))
        ys.append(np.full(n, j))
    order = rng.permutation(sum(n_per))
    return np.concatenate(xs)[order].astype(np.float32), np.concatenate(ys)[order]


@pytest.fixture(scope="module")
def overlapping():
    # Overlapping clusters, so Lloyd takes several iterations and borderline points exist.
    x, y = blobs(n_per=(400, 300, 350, 250, 300), dim=8, spread=1.0, sep=1.6, seed=3)
    init = x[np.random.default_rng(1).choice(len(x), 5, replace=False)]
    return x, y, init


def _sklearn(x, init, max_iter, tol):
    return KMeans(len(init), init=init, n_init=1, max_iter=max_iter, tol=tol, algorithm="lloyd").fit(x)


def _canonical(sk):
    """scikit-learn's clusters renumbered by size, largest first (the sizes here all differ):
    (centroids, labels) as raybias numbers them."""
    sizes = np.bincount(sk.labels_)
    assert len(set(sizes.tolist())) == len(sizes)
    order = np.argsort(-sizes)
    new_label = np.empty_like(order)
    new_label[order] = np.arange(len(order))
    return sk.cluster_centers_[order], new_label[sk.labels_]


def _check_same(res, sk, x):
    centres, sk_labels = _canonical(sk)
    labels = assign(x, res.centroids)
    assert (labels == sk_labels).all()
    assert res.inertia == pytest.approx(sk.inertia_, rel=1e-3)
    assert res.n_iter == sk.n_iter_
    np.testing.assert_allclose(res.centroids, centres, atol=1e-4)
    assert res.sizes.tolist() == np.bincount(sk_labels, minlength=len(res.centroids)).tolist()
    assert res.sizes.tolist() == sorted(res.sizes.tolist(), reverse=True)


@pytest.mark.parametrize("tol,max_iter", [(0.0, 300), (1e-4, 300), (0.0, 3)])
def test_matches_sklearn_in_process(overlapping, tol, max_iter):
    x, _, init = overlapping
    sk = _sklearn(x, init, max_iter, tol)
    assert sk.n_iter_ > 2  # the case is not trivial
    res = kmeans_dataset(LocalBlocks(x, block_rows=400), len(init), init_centroids=init, max_iter=max_iter, tol=tol)
    _check_same(res, sk, x)
    assert res.converged == (sk.n_iter_ < max_iter)


def test_matches_sklearn_on_ray_blocks_and_dataset(ray_session, overlapping):
    import pyarrow as pa
    import ray

    from raybias.embed.vectors import vector_array

    x, _, init = overlapping
    sk = _sklearn(x, init, 300, 0.0)
    blocks = VectorBlocks.from_array(x, block_rows=333)
    assert len(blocks.refs) == 5 and blocks.n == len(x)
    _check_same(kmeans_dataset(blocks, 5, init_centroids=init, max_iter=300, tol=0.0), sk, x)

    # A Ray Dataset with a fixed-size-list vector column, as embed/vectors/ stores it.
    table = pa.table({"id": [f"r{i:05d}" for i in range(len(x))], "vector": vector_array(x)})
    ds = ray.data.from_arrow(table).repartition(4)
    res = kmeans_dataset(ds, 5, init_centroids=init, max_iter=300, tol=0.0)
    assert res.inertia == pytest.approx(sk.inertia_, rel=1e-3)
    assert res.n_iter == sk.n_iter_
    # assign() on the Dataset adds a cluster column that agrees with scikit-learn row by row.
    out = assign(ds, res.centroids).to_pandas().sort_values("id")
    assert out["cluster"].tolist() == _canonical(sk)[1].tolist()


def test_partial_sums_add_up_across_blocks():
    x, _ = blobs(seed=5)
    c = x[:4]
    whole = lloyd_partial(x, c)
    parts = [lloyd_partial(x[i:i + 97], c, True, 10) for i in range(0, len(x), 97)]
    np.testing.assert_allclose(sum(p[0] for p in parts), whole[0], rtol=1e-5, atol=1e-3)
    assert (sum(p[1] for p in parts) == whole[1]).all()
    assert sum(p[2] for p in parts) == pytest.approx(whole[2], rel=1e-6)


def test_planted_clusters_recovered_distributed(ray_session):
    x, y = blobs(seed=1)
    res = kmeans_dataset(VectorBlocks.from_array(x, block_rows=256), 4, seed=0, sample_size=400, n_init=2)
    labels = assign(x, res.centroids)
    assert adjusted_rand_score(y, labels) >= 0.95
    assert sorted(res.sizes.tolist()) == sorted(np.bincount(y).tolist())
    assert res.converged


def test_deterministic_by_seed():
    x, _ = blobs(n_per=(200, 200, 200), seed=2, sep=1.5)
    a = kmeans_dataset(x, 3, seed=7, sample_size=300)
    b = kmeans_dataset(x, 3, seed=7, sample_size=300)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.inertia == b.inertia


def test_kmeans_plusplus_spreads_seeds():
    x, y = blobs(seed=4, sep=10.0)
    seeds = kmeans_plusplus(x, 4, np.random.default_rng(0))
    # Each seed lands in a different planted cluster when clusters are far apart.
    assert len(set(assign(seeds, np.stack([x[y == j].mean(0) for j in range(4)])).tolist())) == 4


def test_empty_cluster_is_relocated():
    x, _ = blobs(n_per=(100, 100), dim=4, seed=6)
    init = np.stack([x[0], x[1], np.full(4, 1e3, np.float32)])  # the third centroid attracts nobody
    res = kmeans_dataset(x, 3, init_centroids=init, max_iter=50, tol=0.0)
    assert (res.sizes > 0).all() and res.sizes.sum() == len(x)


def test_bad_k_and_init_are_refused():
    x, _ = blobs(n_per=(5,), dim=3)
    with pytest.raises(ValueError, match="k = 6"):
        kmeans_dataset(x, 6)
    with pytest.raises(ValueError, match="init_centroids has shape"):
        kmeans_dataset(x, 2, init_centroids=np.zeros((3, 3)))


def _cluster_cfg(**values):
    return config_from_dict({"cluster": values}).cluster


def test_auto_finds_planted_k(ray_session):
    x, y = blobs(n_per=(150, 200, 120, 180), dim=12, seed=8)
    got = cluster_group(VectorBlocks.from_array(x, block_rows=200), _cluster_cfg(k="auto", k_min=2, k_max=7))
    assert got.k == 4 and got.chosen_by == "auto"
    assert set(got.silhouette) == set(range(2, 8))
    assert adjusted_rand_score(y, assign(x, got.result.centroids)) >= 0.95


def test_small_one_and_empty_groups():
    x, _ = blobs(n_per=(12,), dim=5)
    small = cluster_group(LocalBlocks(x), _cluster_cfg(k="auto", min_group_size=20))
    assert (small.k, small.chosen_by) == (1, "small_group")
    np.testing.assert_allclose(small.result.centroids[0], x.mean(0), atol=1e-5)
    one = cluster_group(LocalBlocks(x[:1]), _cluster_cfg(k=3, min_group_size=1))
    assert one.k == 1 and one.result.sizes.tolist() == [1] and one.result.inertia == pytest.approx(0.0, abs=1e-6)
    empty = cluster_group(LocalBlocks(np.zeros((0, 5), np.float32)), _cluster_cfg())
    assert (empty.k, empty.chosen_by, empty.result) == (0, "empty", None)
    assert candidate_ks(2, 6, 4) == [2, 3]


# ---------------------------------------------------------------------------------------
# A function of the data and the seed only; canonical cluster numbers.

def _ided(seed=3):
    """Overlapping clusters (so the sample and the seeding matter) with string ids, in id order."""
    x, _ = blobs(n_per=(400, 300, 350, 250, 300), dim=8, spread=1.0, sep=1.6, seed=seed)
    return x, np.array([f"img-{i:05d}" for i in range(len(x))], dtype=object)


FIT = dict(k=5, seed=0, sample_size=500, n_init=2, max_iter=100, tol=1e-4)  # sample < n: k-means++ on a sample


def _labels_by_id(blocks, res):
    """{id: cluster} of every row of LocalBlocks or VectorBlocks."""
    if isinstance(blocks, VectorBlocks):
        pairs = list(blocks.iter_labels(res.centroids))
    else:
        pairs = [(i, assign(b, res.centroids)) for b, i in zip(blocks.blocks, blocks.ids)]
    return {str(i): int(c) for ids, labels in pairs for i, c in zip(ids, labels)}


def _assert_identical(a, b):
    np.testing.assert_array_equal(a.centroids, b.centroids)  # bitwise, not merely close
    assert a.sizes.tolist() == b.sizes.tolist()
    assert (a.inertia, a.n_iter, a.converged) == (b.inertia, b.n_iter, b.converged)


def test_same_clusters_whatever_the_row_order():
    x, ids = _ided()
    ref_blocks = LocalBlocks(x, block_rows=300, ids=ids)
    assert len(ref_blocks.sizes) == 6  # several blocks: the layout, not one matrix, is what is canonical
    ref = kmeans_dataset(ref_blocks, **FIT)
    ref_labels = _labels_by_id(ref_blocks, ref)
    for trial in range(4):
        perm = np.random.default_rng(trial).permutation(len(x))
        blocks = LocalBlocks(x[perm], block_rows=300, ids=ids[perm])
        # The same blocks, row for row, whatever the input order ...
        for b, rb in zip(blocks.blocks, ref_blocks.blocks):
            np.testing.assert_array_equal(b, rb)
        res = kmeans_dataset(blocks, **FIT)
        _assert_identical(res, ref)
        # ... and every image in the same cluster, with the same number (not merely up to a permutation).
        labels = _labels_by_id(blocks, res)
        assert labels == ref_labels
        assert adjusted_rand_score([ref_labels[i] for i in ids], [labels[i] for i in ids]) == 1.0
    # Without ids a row is keyed by its bytes: a plain array in any row order gives the same fit.
    plain = kmeans_dataset(x, **FIT)
    _assert_identical(kmeans_dataset(x[np.random.default_rng(9).permutation(len(x))], **FIT), plain)
    # The seed does matter on this data (so the checks above are not vacuous).
    other = kmeans_dataset(ref_blocks, **{**FIT, "seed": 1})
    assert not np.array_equal(other.centroids, ref.centroids)


def test_same_clusters_whatever_the_blocks_ray_delivers(ray_session):
    import pyarrow as pa
    import ray

    from raybias.embed.vectors import vector_array

    x, ids = _ided()
    group = np.arange(len(x)) % 2  # two groups, as the cluster stage splits them
    local = {g: LocalBlocks(x[group == g], block_rows=300, ids=ids[group == g]) for g in (0, 1)}
    want = {g: kmeans_dataset(local[g], **FIT) for g in (0, 1)}
    want_labels = {g: _labels_by_id(local[g], want[g]) for g in (0, 1)}
    for trial, n_parts in enumerate((1, 3, 7)):
        perm = np.random.default_rng(10 + trial).permutation(len(x))
        table = pa.table({"id": ids[perm].tolist(), "group": group[perm], "vector": vector_array(x[perm])})
        ds = ray.data.from_arrow(table).repartition(n_parts)
        by_group = VectorBlocks.split_dataset(ds, "group", [0, 1], id_column="id", block_rows=300)
        for g in (0, 1):
            blocks = by_group[g]
            # The object-store blocks are the in-process layout, row for row.
            assert blocks.sizes == local[g].sizes
            for ref, b in zip(blocks.refs, local[g].blocks):
                np.testing.assert_array_equal(ray.get(ref), b)
            res = kmeans_dataset(blocks, **FIT)
            _assert_identical(res, want[g])
            assert _labels_by_id(blocks, res) == want_labels[g]
    # from_dataset and from_array lay the rows out the same way.
    perm = np.random.default_rng(20).permutation(len(x))
    rows = group[perm] == 0
    table = pa.table({"id": ids[perm][rows].tolist(), "vector": vector_array(x[perm][rows])})
    blocks = VectorBlocks.from_dataset(ray.data.from_arrow(table).repartition(5), id_column="id", block_rows=300)
    _assert_identical(kmeans_dataset(blocks, **FIT), want[0])
    _assert_identical(kmeans_dataset(VectorBlocks.from_array(x[perm][rows], 300, ids[perm][rows]), **FIT), want[0])


def test_canonical_layout_keys():
    x, ids = _ided()
    layout = canonical_layout(x, ids, block_rows=400)
    assert len(layout) == 4 and sum(len(b) for b, _ in layout) == len(x)
    got = np.concatenate([i for _, i in layout])
    assert sorted(got.tolist()) == ids.tolist()
    by_id = dict(zip(ids.tolist(), x))
    for b, i in layout:
        np.testing.assert_array_equal(b, np.stack([by_id[j] for j in i]))  # rows stay with their ids
    # A repeated id (with different vectors) is ordered by the vectors' bytes, not by input order.
    dup = ids.copy()
    dup[7] = dup[3]
    a = canonical_layout(x, dup, block_rows=400)
    perm = np.random.default_rng(0).permutation(len(x))
    b = canonical_layout(x[perm], dup[perm], block_rows=400)
    for (xa, ia), (xb, ib) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        assert ia.tolist() == ib.tolist()


def test_clusters_numbered_by_size_then_smallest_id():
    # Far-apart clusters with tied sizes (90, 90, 60, 60, 30): every seed finds the same partition.
    x, truth = blobs(n_per=(60, 90, 30, 60, 90), dim=6, spread=0.5, sep=12.0, seed=11)
    ids = np.array([f"id-{i:04d}" for i in np.random.default_rng(2).permutation(len(x))], dtype=object)
    fits = []
    for seed in range(3):
        blocks = LocalBlocks(x, block_rows=100, ids=ids)
        res = kmeans_dataset(blocks, k=5, seed=seed, sample_size=200)
        labels = assign(x, res.centroids)
        assert adjusted_rand_score(truth, labels) == 1.0
        assert res.sizes.tolist() == [90, 90, 60, 60, 30] == np.bincount(labels).tolist()
        smallest = [min(ids[labels == j]) for j in range(5)]
        assert smallest[0] < smallest[1] and smallest[2] < smallest[3]
        fits.append((res, labels))
    # Different seeds, same clusters: the same numbers and the same centroids.
    for res, labels in fits[1:]:
        assert (labels == fits[0][1]).all()
        np.testing.assert_allclose(res.centroids, fits[0][0].centroids, atol=1e-6)
    # Without ids, ties go by the smallest position in the canonical layout (here: still sizes first).
    res = kmeans_dataset(x, k=5, seed=0, sample_size=200)
    assert res.sizes.tolist() == [90, 90, 60, 60, 30]
    firsts = [int(np.flatnonzero(assign(np.concatenate(LocalBlocks(x).blocks), res.centroids) == j)[0])
              for j in range(5)]
    assert firsts[0] < firsts[1] and firsts[2] < firsts[3]
