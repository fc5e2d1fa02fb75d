"""The cluster stage on a real embedded colored_digits run, including empty and one-image groups."""

from __future__ import annotations

import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import adjusted_rand_score

from conftest import small_config
from raybias.clustering import read_clusters
from raybias.data.io import read_table
from raybias.embed import read_vectors
from raybias.rundir import RunDir
from raybias.stages.cluster import run_cluster


def copy_run(embedded_run, tmp_path, **sections):
    """A private copy of the embedded run, with a config carrying `sections`."""
    _, source, info = embedded_run
    shutil.copytree(source.root, tmp_path / "run")
    cfg = small_config(tmp_path, data={"severity": 0.95, "image_size": 16}, **sections)
    return cfg, RunDir(cfg.run_dir), info


def _png_ok(run, rel):
    data = run.read_bytes(rel)
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_auto_k_on_colored_digits(embedded_run, tmp_path):
    cfg, run, info = copy_run(embedded_run, tmp_path, cluster={"k": "auto", "k_min": 2, "k_max": 6})
    summary = run_cluster(cfg, run, verbose=False)
    assert run.is_done("cluster")
    df, by_group = read_clusters(run)
    ids, groups, _ = read_vectors(run)
    assert df["id"].tolist() == ids.tolist() and df["group"].tolist() == groups.tolist()
    for g in range(info.n_groups):
        e = by_group[g]
        n = info.train_count(g)
        assert e["n"] == n and sum(e["sizes"]) == n
        assert len(e["centroids"]) == e["k"] and len(e["sizes"]) == e["k"]
        labels = df.loc[df["group"] == g, "cluster"]
        assert np.bincount(labels, minlength=e["k"]).tolist() == e["sizes"]
        assert e["sizes"] == sorted(e["sizes"], reverse=True)  # numbered by size, largest first
        if n >= cfg.cluster.min_group_size:
            assert e["chosen_by"] == "auto" and 2 <= e["k"] <= 6
            assert set(e["silhouette"]) == {str(k) for k in range(2, 7)}
            assert e["silhouette"][str(e["k"])] == max(e["silhouette"].values())
        else:
            assert e["k"] == 1 and e["chosen_by"] == "small_group"
    # The five digits of a group are its visual modes: auto picks about five clusters for the big groups.
    assert all(4 <= by_group[g]["k"] <= 6 for g in range(info.n_groups) if info.train_count(g) > 300)
    assert summary == {str(g): e for g, e in by_group.items()}
    assert _png_ok(run, "embed/clusters_projection.png") and _png_ok(run, "embed/clusters_samples.png")
    # Resume: nothing is redone.
    assert run_cluster(cfg, run, mode="resume", verbose=False) == summary


def _reshard_shuffled(run, seed, n_shards):
    """Rewrite embed/vectors as n_shards files of unequal size holding the rows in a random order."""
    from raybias.data.io import MARKER, shard_paths

    ids, groups, m = read_vectors(run)
    perm = np.random.default_rng(seed).permutation(len(ids))
    cuts = np.sort(np.random.default_rng(seed + 1).choice(np.arange(1, len(ids)), n_shards - 1, replace=False))
    for p in shard_paths(run, "embed/vectors"):
        run.fs.delete_file(p)
    for i, rows in enumerate(np.split(perm, cuts)):
        table = pa.table({"id": ids[rows].tolist(), "group": groups[rows],
                          "vector": pa.FixedSizeListArray.from_arrays(pa.array(m[rows].reshape(-1)), m.shape[1])})
        pq.write_table(table, run.path(f"embed/vectors/part-{i}.parquet"), filesystem=run.fs)
    run.write_bytes(f"embed/vectors/{MARKER}", b"")


def test_distributed_fixed_k_is_order_invariant_and_follows_digits(embedded_run, tmp_path):
    # sample_size below the big groups' sizes: they are clustered by Ray tasks over object-store blocks.
    cfg, run, info = copy_run(embedded_run, tmp_path, cluster={"k": 5, "sample_size": 200, "n_init": 4})
    first = run_cluster(cfg, run, verbose=False)
    df1, _ = read_clusters(run)
    raw1 = pq.read_table(run.path("embed/clusters.parquet"), filesystem=run.fs)
    # The same vectors in other files, in another row order: Ray Data delivers other blocks in
    # another order, yet every cluster, number, centroid and size is the same, and so is the file.
    _reshard_shuffled(run, seed=5, n_shards=3)
    second = run_cluster(cfg, run, verbose=False)
    df2, _ = read_clusters(run)
    assert first == second and df1.equals(df2)
    assert pq.read_table(run.path("embed/clusters.parquet"), filesystem=run.fs).equals(raw1)
    for g, e in first.items():
        assert e["sizes"] == sorted(e["sizes"], reverse=True)
        rows = df1[df1["group"] == int(g)]
        if e["k"] > 1:  # equal sizes are numbered by their smallest image id
            smallest = rows.groupby("cluster")["id"].min()
            for j in range(e["k"] - 1):
                assert e["sizes"][j] > e["sizes"][j + 1] or smallest[j] < smallest[j + 1]
    digits = read_table(run, "data/real", columns=["id", "digit", "split"], split="train")
    merged = df1.merge(digits, on="id")
    for g in range(info.n_groups):
        rows = merged[merged["group"] == g]
        if len(rows) > 300:
            assert first[str(g)]["k"] == 5 and first[str(g)]["chosen_by"] == "fixed"
            assert adjusted_rand_score(rows["digit"], rows["cluster"]) >= 0.7


def test_empty_and_one_image_groups(embedded_run, tmp_path):
    from raybias.data.info import DatasetInfo
    from raybias.data.io import MARKER, shard_paths

    cfg, run, info = copy_run(embedded_run, tmp_path, cluster={"k": "auto", "min_group_size": 20})
    # Keep one training image of group 1 and none of group 2, in the vectors and the counts.
    ids, groups, m = read_vectors(run)
    keep = (groups != 2) & ((groups != 1) | (np.cumsum(groups == 1) == 1))
    one_id = ids[(groups == 1) & keep][0]
    table = pa.table({"id": ids[keep].tolist(), "group": groups[keep],
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(m[keep].reshape(-1)), m.shape[1])})
    for p in shard_paths(run, "embed/vectors"):
        run.fs.delete_file(p)
    pq.write_table(table, run.path("embed/vectors/part-0.parquet"), filesystem=run.fs)
    run.write_bytes(f"embed/vectors/{MARKER}", b"")
    data = DatasetInfo.load(run)
    data.counts["train"]["1"], data.counts["train"]["2"] = 1, 0
    data.save(run)
    # edited by hand on purpose: prepare's record no longer vouches for its outputs
    manifest = run.manifest()
    manifest["stages"]["prepare"].pop("outputs")
    run.write_json("manifest.json", manifest)

    summary = run_cluster(cfg, run, verbose=False)
    assert summary["1"]["k"] == 1 and summary["1"]["sizes"] == [1] and summary["1"]["chosen_by"] == "small_group"
    np.testing.assert_allclose(summary["1"]["centroids"][0], m[ids == one_id][0], atol=1e-6)
    assert summary["2"] == {"name": info.group_name(2), "n": 0, "k": 0, "chosen_by": "empty", "sizes": [],
                            "centroids": [], "inertia": 0.0, "iterations": 0, "converged": True}
    df, _ = read_clusters(run)
    assert df.loc[df["group"] == 1, ["id", "cluster"]].values.tolist() == [[one_id, 0]]
    assert (df["group"] != 2).all() and len(df) == keep.sum()
    assert _png_ok(run, "embed/clusters_samples.png")


def test_cluster_needs_embed(prepared_run, tmp_path):
    from raybias.data.io import TableMissing

    _, source, _ = prepared_run
    shutil.copytree(source.root, tmp_path / "run")
    cfg = small_config(tmp_path, data={"severity": 0.95, "image_size": 16})
    run = RunDir(cfg.run_dir)
    with pytest.raises(TableMissing, match="raybias embed"):
        run_cluster(cfg, run, verbose=False)
    assert not run.is_done("cluster")
