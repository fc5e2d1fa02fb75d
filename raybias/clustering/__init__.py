"""K-means on Ray (distributed Lloyd over object-store blocks), choice of k, and cluster plots.

    from raybias.clustering import kmeans_dataset, assign, read_clusters
    res = kmeans_dataset(vectors, k=4, max_iter=50, tol=1e-4, seed=0)   # numpy, VectorBlocks or Ray Dataset
    res.centroids, res.inertia, res.n_iter, res.sizes
    labels = assign(vectors, res.centroids)

The cluster stage writes `embed/clusters.parquet` (id, group, cluster) and
`embed/clusters.json`; `read_clusters(run)` reads both back.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

from raybias.clustering.kmeans import (
    KMeansResult, LocalBlocks, VectorBlocks, assign, kmeans_dataset, kmeans_plusplus)
from raybias.layout import CLUSTERS_JSON, CLUSTERS_PARQUET


def read_clusters(run) -> Tuple["Any", Dict[int, Dict[str, Any]]]:
    """(assignments DataFrame id, group, cluster sorted by id; {group: summary}) of a clustered run."""
    import pyarrow.parquet as pq

    from raybias.data.io import TableMissing

    if not run.exists(CLUSTERS_JSON) or not run.exists(CLUSTERS_PARQUET):
        raise TableMissing(f"{run.path(CLUSTERS_JSON)} does not exist (run `raybias cluster` first)")
    df = pq.read_table(run.path(CLUSTERS_PARQUET), filesystem=run.fs).to_pandas()
    df = df.sort_values("id", kind="stable").reset_index(drop=True)
    summary = {int(g): v for g, v in run.read_json(CLUSTERS_JSON).items()}
    return df, summary


__all__ = ["KMeansResult", "LocalBlocks", "VectorBlocks", "assign", "kmeans_dataset", "kmeans_plusplus",
           "read_clusters"]
