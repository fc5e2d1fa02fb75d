"""Stage `cluster`: K-means per group on the image embeddings -> `embed/clusters.*` and plots.

One Ray Data pass over `embed/vectors/` splits every block by group into float32 matrices kept
in Ray's object store, laid out canonically by image id (`VectorBlocks.split_dataset`), so the
clusters are a function of the vectors and cluster.seed only, whatever the order of the files,
of their rows, or in which Ray Data delivers its blocks. Each group is then clustered there
(`raybias.clustering`): k-means++ on a sample of cluster.sample_size rows, then distributed
Lloyd iterations (cluster.max_iter, cluster.tol). A group no larger than the sample is already
wholly on the driver and is clustered in-process. k is cluster.k, or chosen by silhouette when
cluster.k is "auto"; a group with fewer than cluster.min_group_size images gets k = 1 and an
empty group k = 0 (no clusters). Clusters are numbered by size, largest first, ties by their
smallest image id, so that names and seeds downstream (one model per group and cluster) are
stable.

Outputs:
- embed/clusters.parquet   id, group, cluster  (every embedded training image)
- embed/clusters.json      {group: {name, n, k, chosen_by, sizes, centroids, inertia,
                            iterations, converged, silhouette {k: score} when auto}}
- embed/clusters_projection.png, embed/clusters_samples.png
"""

from __future__ import annotations

import posixpath
from typing import Any, Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raybias.clustering.kmeans import VectorBlocks, assign_block, squared_distances
from raybias.clustering.plots import projection_figure, samples_figure
from raybias.clustering.select_k import cluster_group
from raybias.console import say
from raybias.data.images import decode
from raybias.data.info import DatasetInfo
from raybias.data.io import shard_paths
from raybias.embed import vectors_dataset
from raybias.layout import (CLUSTER_KEY, CLUSTERS_JSON, CLUSTERS_PARQUET, CLUSTERS_PROJECTION_PNG,
                            CLUSTERS_SAMPLES_PNG, EMBED_DIR, EMBED_KEY, PREPARE_KEY, REAL, VECTORS)
from raybias.methods import CLUSTER
from raybias.ray_utils import init_ray
from raybias.rundir import RunDir, StageFailed

PLOT_POINTS = 1500  # points per group in the projection plot
PER_CLUSTER = 6  # images per cluster in the sample grid

ASSIGNMENT_SCHEMA = pa.schema([("id", pa.string()), ("group", pa.int64()), ("cluster", pa.int64())])


def _images_by_id(run: RunDir, ids: List[str]) -> Dict[str, np.ndarray]:
    """Decoded images of these ids from data/real (only the matching rows are read)."""
    if not ids:
        return {}
    out: Dict[str, np.ndarray] = {}
    for path in shard_paths(run, REAL):
        table = pq.read_table(path, columns=["id", "image"], filters=[("id", "in", list(ids))], filesystem=run.fs)
        for row_id, data in zip(table.column("id").to_pylist(), table.column("image").to_pylist()):
            out[row_id] = decode(data, where=f"{run.path(REAL)} row id={row_id}")
    return out


def run_cluster(cfg, run: RunDir, mode: str = "fresh", verbose: bool = True) -> Dict[str, Any]:
    """Cluster every group's embeddings; returns the contents of embed/clusters.json."""
    st = run.stage(CLUSTER_KEY, cfg, CLUSTER, mode, outputs=(CLUSTERS_PARQUET, CLUSTERS_JSON),
                   owns=(CLUSTERS_PARQUET, CLUSTERS_JSON), needs=(PREPARE_KEY, EMBED_KEY))
    if st.skip:
        if verbose:
            say("cluster: already done, skipped")
        return run.read_json(CLUSTERS_JSON)
    init_ray(cfg)
    from raybias.console import bar as progress_bar

    info = DatasetInfo.load(run)
    # Any block order will do: split_dataset lays the vectors out canonically by id.
    vectors = vectors_dataset(run, columns=["id", "group", "vector"])
    c = cfg.cluster

    summary: Dict[str, Any] = {}
    projection: List[Dict[str, Any]] = []
    typical: List[Dict[str, Any]] = []
    tmp_parquet = run.staging(CLUSTERS_PARQUET)
    run.makedirs(posixpath.dirname(CLUSTERS_PARQUET))
    writer = pq.ParquetWriter(run.path(tmp_parquet), ASSIGNMENT_SCHEMA, filesystem=run.fs)
    # One pass over embed/vectors puts each group's vectors in the object store as its own blocks.
    by_group = VectorBlocks.split_dataset(vectors, "group", [g for g in range(info.n_groups) if info.train_count(g)],
                                          id_column="id")
    try:
        for g in progress_bar(iterable=range(info.n_groups), desc="cluster", unit="group", disable=not verbose):
            name = info.group_name(g)
            n_g = info.train_count(g)
            title = f"group {g}: {name} (n={n_g})"
            if n_g == 0:
                summary[str(g)] = {"name": name, "n": 0, "k": 0, "chosen_by": "empty", "sizes": [],
                                   "centroids": [], "inertia": 0.0, "iterations": 0, "converged": True}
                projection.append({"title": title, "points": None})
                typical.append({"title": title, "rows": []})
                continue
            blocks = by_group.pop(g)
            if blocks.n != n_g:
                raise StageFailed(f"{run.path(VECTORS)} has {blocks.n} vectors of group {g} ({name}) but "
                                  f"{REAL} has {n_g} training images: rerun `raybias embed`")
            rows = blocks.sample_rows(int(c.sample_size), int(c.seed))
            sample = blocks.take(rows)
            sample_ids = blocks.take_ids(rows)
            chosen = cluster_group(blocks, c, sample=sample, sample_ids=sample_ids)
            fit = chosen.result
            for ids, labels in blocks.iter_labels(fit.centroids):
                writer.write_table(pa.table({"id": pa.array(ids.tolist(), pa.string()),
                                             "group": pa.array(np.full(len(ids), g), pa.int64()),
                                             "cluster": pa.array(labels, pa.int64())}, schema=ASSIGNMENT_SCHEMA))
            entry = {"name": name, "n": int(n_g), "k": int(chosen.k), "chosen_by": chosen.chosen_by,
                     "sizes": [int(s) for s in fit.sizes], "centroids": fit.centroids.astype(float).tolist(),
                     "inertia": float(fit.inertia), "iterations": int(fit.n_iter), "converged": bool(fit.converged)}
            if chosen.silhouette:
                entry["silhouette"] = {str(k): float(v) for k, v in chosen.silhouette.items()}
            summary[str(g)] = entry

            sample_labels = assign_block(sample, fit.centroids)
            dist = squared_distances(sample, fit.centroids)[np.arange(len(sample)), sample_labels]
            shown = np.random.default_rng(int(c.seed)).permutation(len(sample))[:PLOT_POINTS]
            projection.append({"title": f"{title}, k={chosen.k}", "points": sample[shown],
                               "labels": sample_labels[shown], "centroids": fit.centroids})
            picks = []
            for j in range(chosen.k):
                members = np.flatnonzero(sample_labels == j)
                members = members[np.argsort(dist[members], kind="stable")][:PER_CLUSTER]
                picks.append((f"cluster {j} (n={int(fit.sizes[j])})", [str(i) for i in sample_ids[members]]))
            typical.append({"title": f"{title}, k={chosen.k}", "rows": picks})
            del blocks  # frees the group's vectors in the object store
        writer.close()
    except BaseException:
        writer.close()
        run.delete(tmp_parquet)
        raise
    run.delete(CLUSTERS_PARQUET)
    run.fs.move(run.path(tmp_parquet), run.path(CLUSTERS_PARQUET))
    run.write_json(CLUSTERS_JSON, summary)
    _write_plots(run, projection, typical)
    st.finish({"k": {g: e["k"] for g, e in summary.items()}})
    if verbose:
        for g, e in summary.items():
            extra = ""
            if "silhouette" in e:
                extra = "  silhouette " + ", ".join(f"k={k}: {v:.3f}" for k, v in e["silhouette"].items())
            say(f"group {g} {e['name']}: n={e['n']} k={e['k']} ({e['chosen_by']}) sizes={e['sizes']}{extra}")
        say(f"clusters -> {run.path(CLUSTERS_PARQUET)}, plots in {run.path(EMBED_DIR)}")
    return summary


def _write_plots(run: RunDir, projection: List[Dict[str, Any]], typical: List[Dict[str, Any]]) -> None:
    import matplotlib.pyplot as plt

    fig = projection_figure(projection)
    run.write_figure(CLUSTERS_PROJECTION_PNG, fig)
    plt.close(fig)
    wanted = [i for panel in typical for _, ids in panel["rows"] for i in ids]
    images = _images_by_id(run, wanted)
    panels = [{"title": p["title"], "rows": [(label, [images[i] for i in ids if i in images])
                                             for label, ids in p["rows"]]} for p in typical]
    fig = samples_figure(panels, PER_CLUSTER)
    run.write_figure(CLUSTERS_SAMPLES_PNG, fig)
    plt.close(fig)
