"""The K-means core: same answer as scikit-learn, planted clusters recovered, k chosen, Ray paths."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from raybias.clustering.kmeans import (LocalBlocks, VectorBlocks, assign, kmeans_dataset, kmeans_plusplus,
                                       lloyd_partial)
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


def _check_same(res, sk, x):
    labels = assign(x, res.centroids)
    assert (labels == sk.labels_).all()
    assert res.inertia == pytest.approx(sk.inertia_, rel=1e-3)
    assert res.n_iter == sk.n_iter_
    np.testing.assert_allclose(res.centroids, sk.cluster_centers_, atol=1e-4)
    assert res.sizes.tolist() == np.bincount(sk.labels_, minlength=len(res.centroids)).tolist()


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
    assert out["cluster"].tolist() == sk.labels_.tolist()


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
